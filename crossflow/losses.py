"""Pretraining losses, as pure functions of tensors.

Cross-pixel optical-flow similarity (paper eqs. 2-5), per image with N sampled pixels:

    K_phi(p, q) = 0.25 * cos(phi_p, phi_q)            K_f(p, q) = exp(-||f_p - f_q||^2 / (2 sigma^2))
    S_*(., q)   = softmax_p(K_*(p, q) - [p == q])     (the diagonal rule gives the paper's 1 and e^-3/4)
    loss_image  = -(1/N) sum_q sum_p S_f(p, q) log S_phi(p, q)      loss = mean over images

Direct baseline ("Ours direct reg."): each normalised flow component in [-1, 1] is
discretised into uniform bins and predicted with a softmax cross-entropy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EMBEDDING_KERNEL_SCALE = 0.25


def squared_flow_distances(flow: torch.Tensor) -> torch.Tensor:
    """``||f_p - f_q||^2``: flow ``[B, N, 2]`` -> ``[B, N, N]``."""
    du = flow[..., 0].unsqueeze(2) - flow[..., 0].unsqueeze(1)
    dv = flow[..., 1].unsqueeze(2) - flow[..., 1].unsqueeze(1)
    return du.square_().add_(dv.square_())


def gaussian_of_distances(squared_distances: torch.Tensor, sigma2: torch.Tensor | float) -> torch.Tensor:
    """``exp(-d^2 / (2 sigma^2))`` with the exponent clamped 1 above the log of the smallest normal float: the values
    below are (nearly) subnormal, which changes no softmax at this precision, and exp is 10-25x slower there on x86
    CPUs (2.3-4.5 ms against 0.17 ms for 512 x 512 exponents near -400, one thread)."""
    exponent = squared_distances / (-2 * sigma2)
    return torch.exp(exponent.clamp_min(math.log(torch.finfo(exponent.dtype).tiny) + 1))


def flow_kernel(flow: torch.Tensor, sigma2: torch.Tensor | float) -> torch.Tensor:
    """Gaussian flow kernel ``K_f``: flow ``[B, N, 2]`` -> ``[B, N, N]``."""
    return gaussian_of_distances(squared_flow_distances(flow), sigma2)


def embedding_kernel(embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine embedding kernel ``K_phi = 0.25 cos``: embeddings ``[B, N, D]`` -> ``[B, N, N]``."""
    unit = F.normalize(embeddings, dim=-1)
    return EMBEDDING_KERNEL_SCALE * unit @ unit.transpose(1, 2)


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs (bf16/fp16 autocast) are upcast: the softmaxes need float32."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _column_softmax(kernel: torch.Tensor) -> torch.Tensor:
    """``S(., q) = softmax_p(K(p, q) - [p == q])`` of a kernel ``[B, N, N]``: each column sums to 1 over dim 1."""
    return torch.softmax(kernel - torch.eye(kernel.shape[-1], dtype=kernel.dtype, device=kernel.device), dim=1)


def flow_target_distribution(flow: torch.Tensor, sigma2: torch.Tensor | float) -> torch.Tensor:
    """``S_f [B, N, N]``: column q is the flow's distribution over pixels p (sums to 1 over dim 1)."""
    return _column_softmax(flow_kernel(flow, sigma2))


def _summed_loss_and_gradients(
    unit: torch.Tensor, flow: torch.Tensor, sigma2: torch.Tensor, with_gradients: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """For a chunk of images, ``L = -sum_{images, p, q} S_f log S_phi`` and, if asked, ``dL/d unit`` and ``dL/d sigma2``.

    With ``P = S_phi``, ``T = S_f`` (columns summing to 1 over p) and ``W = T * log P``:
        dL/dK_phi = P - T                               dL/d unit = 0.25 (G + G^T) unit,  G = P - T
        dL/dsigma2 = -sum_{p,q} (W - T * sum_p W) K_f ||f_p - f_q||^2 / (2 sigma^4)
    unit ``[b, N, D]`` (unit rows), flow ``[b, N, 2]``, sigma2 0-d -> (0-d, ``[b, N, D]``, 0-d).
    """
    squared_distances = squared_flow_distances(flow)
    kernel_f = gaussian_of_distances(squared_distances, sigma2)
    target = _column_softmax(kernel_f)
    eye = torch.eye(unit.shape[1], dtype=unit.dtype, device=unit.device)
    log_prediction = torch.log_softmax(
        torch.baddbmm(eye, unit, unit.transpose(1, 2), beta=-1, alpha=EMBEDDING_KERNEL_SCALE), dim=1
    )
    weighted = target * log_prediction
    loss = -weighted.sum()
    if not with_gradients:
        return loss, None, None
    target_softmax_grad = weighted.sub_(target * weighted.sum(dim=1, keepdim=True))
    grad_sigma2 = -target_softmax_grad.mul_(kernel_f).mul_(squared_distances).sum() / (2 * sigma2 * sigma2)
    grad_kernel = log_prediction.exp_().sub_(target)
    grad_unit = torch.baddbmm(torch.bmm(grad_kernel, unit), grad_kernel.transpose(1, 2), unit)
    return loss, grad_unit.mul_(EMBEDDING_KERNEL_SCALE), grad_sigma2


def _images_per_chunk(unit: torch.Tensor) -> int:
    """CPU: as many images as keep each ``[b, N, N]`` temporary within 2^17 floats (512 KB: the chunk's few live
    temporaries stay in a 2 MB L2 cache); at batch 96, N 512 on one thread the loss and gradients take 0.17 s
    against 0.65 s for the whole batch at once. CUDA: up to 2^26 floats a temporary (the whole batch at the paper config)."""
    budget = 2**26 if unit.is_cuda else 2**17
    return max(1, budget // unit.shape[1] ** 2)


class _CrossPixelSimilarity(torch.autograd.Function):
    """The loss with its analytic gradient (:func:`_summed_loss_and_gradients`), computed in the forward pass chunk by
    chunk of images. Written by hand because autograd over the composed operations keeps a dozen ``[B, N, N]`` tensors
    (100 MB each at the paper config) and is memory-bound: 1.16 s for forward + backward at batch 96, N 512 on one CPU
    thread against 0.17 s here (same values to float rounding; gradcheck in tests/test_losses.py)."""

    @staticmethod
    def forward(ctx, unit: torch.Tensor, flow: torch.Tensor, sigma2: torch.Tensor, with_gradients: bool) -> torch.Tensor:
        batch, num_points, _ = unit.shape
        scale = 1.0 / (batch * num_points)
        chunk = _images_per_chunk(unit)
        loss = unit.new_zeros(())
        grad_unit, grad_sigma2 = (torch.empty_like(unit), unit.new_zeros(())) if with_gradients else (None, None)
        with torch.autocast(unit.device.type, enabled=False):  # float32 throughout, whatever the training precision
            for start in range(0, batch, chunk):
                part = slice(start, start + chunk)
                part_loss, part_grad_unit, part_grad_sigma2 = _summed_loss_and_gradients(
                    unit[part], flow[part], sigma2, with_gradients
                )
                loss += part_loss
                if with_gradients:
                    grad_unit[part] = part_grad_unit
                    grad_sigma2 += part_grad_sigma2
        if with_gradients:
            ctx.save_for_backward(grad_unit * scale, grad_sigma2 * scale)
        return loss * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        grad_unit, grad_sigma2 = ctx.saved_tensors
        return grad_unit * grad_loss, None, grad_sigma2 * grad_loss, None


def cross_pixel_similarity_loss(
    embeddings: torch.Tensor, flow: torch.Tensor, sigma2: torch.Tensor | float
) -> torch.Tensor:
    """Cross entropy between flow and embedding similarity distributions (paper eq. 3).

    Args:
        embeddings: ``[B, N, D]`` at any scale (the cosine kernel normalises them).
        flow: ``[B, N, 2]`` normalised flow (eq. 6) at the same pixels.
        sigma2: flow kernel bandwidth, a float or 0-d tensor (gradients flow into it).
    Returns:
        scalar: mean over images of ``-(1/N) sum_{p,q} S_f(p, q) log S_phi(p, q)``.
    """
    embeddings, flow = _at_least_float32(embeddings), _at_least_float32(flow)
    unit = F.normalize(embeddings, dim=-1)
    sigma2 = torch.as_tensor(sigma2, dtype=unit.dtype, device=unit.device)
    with_gradients = torch.is_grad_enabled() and (unit.requires_grad or sigma2.requires_grad)
    return _CrossPixelSimilarity.apply(unit, flow, sigma2, with_gradients)


def flow_target_entropy(flow: torch.Tensor, sigma2: torch.Tensor | float) -> torch.Tensor:
    """``-(1/N) sum_{p,q} S_f log S_f`` averaged over images: the lowest value the loss can reach."""
    target = flow_target_distribution(_at_least_float32(flow), sigma2)
    num_points = flow.shape[1]
    return -(target * torch.log(target.clamp_min(torch.finfo(target.dtype).tiny))).sum(dim=(1, 2)).mean() / num_points


def flow_to_bins(flow: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Normalised flow in ``[-1, 1]`` -> bin indices in ``[0, num_bins)`` (uniform bins, same shape)."""
    return ((flow + 1) / 2 * num_bins).floor().clamp(0, num_bins - 1).long()


def flow_classification_loss(logits: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy on discretised flow, x and y each a classification.

    Args:
        logits: ``[B, N, 2, K]`` (K bins per component).
        flow: ``[B, N, 2]`` normalised flow in ``[-1, 1]``.
    Returns:
        scalar: mean over pixels and both components.
    """
    num_bins = logits.shape[-1]
    return F.cross_entropy(_at_least_float32(logits).reshape(-1, num_bins), flow_to_bins(flow, num_bins).reshape(-1))
