"""Pretraining losses, as pure functions of tensors.

Cross-pixel optical-flow similarity (paper eqs. 2-5), per image with N sampled pixels:

    K_phi(p, q) = 0.25 * cos(phi_p, phi_q)            K_f(p, q) = exp(-||f_p - f_q||^2 / (2 sigma^2))
    S_*(., q)   = softmax_p(K_*(p, q) - [p == q])     (the diagonal rule gives the paper's 1 and e^-3/4)
    loss_image  = -(1/N) sum_q sum_p S_f(p, q) log S_phi(p, q)      loss = mean over images

Direct baseline ("Ours direct reg."): each normalised flow component in [-1, 1] is
discretised into uniform bins and predicted with a softmax cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EMBEDDING_KERNEL_SCALE = 0.25


def flow_kernel(flow: torch.Tensor, sigma2: torch.Tensor | float) -> torch.Tensor:
    """Gaussian flow kernel ``K_f``: flow ``[B, N, 2]`` -> ``[B, N, N]``."""
    du = flow[..., 0].unsqueeze(2) - flow[..., 0].unsqueeze(1)
    dv = flow[..., 1].unsqueeze(2) - flow[..., 1].unsqueeze(1)
    return torch.exp(-(du.square() + dv.square()) / (2 * sigma2))


def embedding_kernel(embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine embedding kernel ``K_phi = 0.25 cos``: embeddings ``[B, N, D]`` -> ``[B, N, N]``."""
    unit = F.normalize(embeddings, dim=-1)
    return EMBEDDING_KERNEL_SCALE * unit @ unit.transpose(1, 2)


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs (bf16/fp16 autocast) are upcast: the softmaxes need float32."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _column_logits(kernel: torch.Tensor) -> torch.Tensor:
    """``K(p, q) - [p == q]``: the logits whose softmax over p (dim 1) is ``S(., q)``."""
    eye = torch.eye(kernel.shape[-1], dtype=kernel.dtype, device=kernel.device)
    return kernel - eye


def flow_target_distribution(flow: torch.Tensor, sigma2: torch.Tensor | float) -> torch.Tensor:
    """``S_f [B, N, N]``: column q is the flow's distribution over pixels p (sums to 1 over dim 1)."""
    return torch.softmax(_column_logits(flow_kernel(flow, sigma2)), dim=1)


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
    target = flow_target_distribution(flow, sigma2)
    log_prediction = torch.log_softmax(_column_logits(embedding_kernel(embeddings)), dim=1)
    num_points = embeddings.shape[1]
    return -(target * log_prediction).sum(dim=(1, 2)).mean() / num_points


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
