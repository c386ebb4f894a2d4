"""The pretraining losses against slow references written from the paper's equations."""

import math

import pytest
import torch

from crossflow.losses import (
    cross_pixel_similarity_loss,
    embedding_kernel,
    flow_classification_loss,
    flow_target_distribution,
    flow_target_entropy,
    flow_to_bins,
)


def reference_cross_pixel_loss(embeddings, flow, sigma2):
    """Eqs. 2-5 with explicit loops: for each column q, S(p, q) with the paper's diagonal terms."""
    total = 0.0
    batch, n, _ = embeddings.shape
    for b in range(batch):
        phi = [embeddings[b, i] / embeddings[b, i].norm() for i in range(n)]
        f = flow[b]
        image_loss = 0.0
        for q in range(n):
            k_phi = [0.25 * float(phi[p] @ phi[q]) for p in range(n)]
            k_f = [math.exp(-float(((f[p] - f[q]) ** 2).sum()) / (2 * sigma2)) for p in range(n)]
            # eq. 4: the diagonal contributes exp(0) = 1; eq. 5: it contributes e^-3/4
            z_f = sum(math.exp(k_f[p]) for p in range(n) if p != q) + 1.0
            z_phi = sum(math.exp(k_phi[p]) for p in range(n) if p != q) + math.exp(-0.75)
            for p in range(n):
                s_f = (1.0 if p == q else math.exp(k_f[p])) / z_f
                s_phi = (math.exp(-0.75) if p == q else math.exp(k_phi[p])) / z_phi
                image_loss -= s_f * math.log(s_phi)
        total += image_loss / n
    return total / batch


@pytest.fixture
def sample():
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(2, 7, 5, generator=generator, dtype=torch.float64)
    flow = torch.rand(2, 7, 2, generator=generator, dtype=torch.float64) * 2 - 1
    return embeddings, flow


def test_matches_reference(sample):
    embeddings, flow = sample
    for sigma2 in (0.0036, 0.1, 2.0):
        expected = reference_cross_pixel_loss(embeddings, flow, sigma2)
        actual = cross_pixel_similarity_loss(embeddings.double(), flow.double(), sigma2)
        assert actual.item() == pytest.approx(expected, rel=1e-5)


def test_gradients_in_float64(sample):
    embeddings, flow = sample
    embeddings = embeddings.clone().requires_grad_(True)
    log_sigma2 = torch.tensor(math.log(0.05), dtype=torch.float64, requires_grad=True)

    def loss(e, s):
        return cross_pixel_similarity_loss(e, flow, s.exp())

    assert torch.autograd.gradcheck(loss, (embeddings, log_sigma2))


def test_invariant_to_pixel_order_and_embedding_scale(sample):
    embeddings, flow = sample
    base = cross_pixel_similarity_loss(embeddings, flow, 0.1)
    order = torch.randperm(embeddings.shape[1], generator=torch.Generator().manual_seed(1))
    assert cross_pixel_similarity_loss(embeddings[:, order], flow[:, order], 0.1).item() == pytest.approx(base.item(), rel=1e-6)
    assert cross_pixel_similarity_loss(embeddings * 37.0, flow, 0.1).item() == pytest.approx(base.item(), rel=1e-6)


def test_images_are_not_compared_with_each_other(sample):
    embeddings, flow = sample
    per_image = [cross_pixel_similarity_loss(embeddings[i : i + 1], flow[i : i + 1], 0.1) for i in range(2)]
    assert cross_pixel_similarity_loss(embeddings, flow, 0.1).item() == pytest.approx(sum(per_image).item() / 2, rel=1e-6)


def test_sigma2_receives_a_gradient(sample):
    embeddings, flow = sample
    sigma2 = torch.tensor(0.05, requires_grad=True)
    cross_pixel_similarity_loss(embeddings.float(), flow.float(), sigma2).backward()
    assert sigma2.grad is not None and sigma2.grad.abs() > 0


def test_loss_is_lowest_when_embeddings_group_like_the_flow():
    """Two rigid motions: embeddings that separate them beat ones that mix them."""
    flow = torch.tensor([[[0.5, 0.0]] * 4 + [[-0.5, 0.0]] * 4])
    grouped = torch.tensor([[[1.0, 0.0]] * 4 + [[-1.0, 0.0]] * 4])
    mixed = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]] * 4])
    assert cross_pixel_similarity_loss(grouped, flow, 0.01) < cross_pixel_similarity_loss(mixed, flow, 0.01)
    assert cross_pixel_similarity_loss(grouped, flow, 0.01) >= flow_target_entropy(flow, 0.01)


def test_flow_bins_are_uniform_over_minus_one_to_one():
    flow = torch.tensor([-1.0, -0.99, -0.875, 0.0, 0.124, 0.125, 0.99, 1.0])
    assert flow_to_bins(flow, 16).tolist() == [0, 0, 1, 8, 8, 9, 15, 15]


def test_flow_classification_loss_is_cross_entropy_per_component():
    logits = torch.randn(2, 3, 2, 4, generator=torch.Generator().manual_seed(0))
    flow = torch.tensor([[[-0.9, 0.1], [0.6, -0.4], [0.99, -1.0]], [[0.0, 0.3], [-0.3, 0.8], [0.2, 0.2]]])
    bins = flow_to_bins(flow, 4)
    expected = -torch.log_softmax(logits, -1).gather(-1, bins.unsqueeze(-1)).mean()
    assert flow_classification_loss(logits, flow).item() == pytest.approx(expected.item(), rel=1e-6)


def autograd_cross_pixel_loss(embeddings, flow, sigma2):
    """Eq. 3 composed from the kernels, differentiated by autograd (the hand-written gradient's reference)."""
    eye = torch.eye(embeddings.shape[1], dtype=embeddings.dtype)
    log_prediction = torch.log_softmax(embedding_kernel(embeddings) - eye, dim=1)
    return -(flow_target_distribution(flow, sigma2) * log_prediction).sum(dim=(1, 2)).mean() / embeddings.shape[1]


def test_chunked_gradients_match_autograd_at_512_points():
    """N = 512 puts one image in each chunk on CPU: the summed chunks give autograd's loss and gradients."""
    generator = torch.Generator().manual_seed(2)
    embeddings = torch.randn(3, 512, 16, generator=generator, dtype=torch.float64)
    flow = torch.rand(3, 512, 2, generator=generator, dtype=torch.float64) * 0.4 - 0.2
    results = []
    for loss_fn in (cross_pixel_similarity_loss, autograd_cross_pixel_loss):
        e = embeddings.clone().requires_grad_(True)
        log_sigma2 = torch.tensor(math.log(0.0036), dtype=torch.float64, requires_grad=True)
        loss = 3.0 * loss_fn(e, flow, log_sigma2.exp())  # an upstream gradient other than 1
        loss.backward()
        results.append((loss.detach(), e.grad, log_sigma2.grad))
    for actual, expected in zip(*results):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-14)


def test_each_input_alone_and_no_grad(sample):
    embeddings, flow = sample
    expected = autograd_cross_pixel_loss(embeddings, flow, 0.1)
    with torch.no_grad():
        assert cross_pixel_similarity_loss(embeddings, flow, 0.1).item() == pytest.approx(expected.item(), rel=1e-12)
    sigma2 = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    cross_pixel_similarity_loss(embeddings, flow, sigma2).backward()  # embeddings without gradient
    reference_sigma2 = sigma2.detach().clone().requires_grad_(True)
    autograd_cross_pixel_loss(embeddings, flow, reference_sigma2).backward()
    torch.testing.assert_close(sigma2.grad, reference_sigma2.grad)


def test_half_precision_embeddings_give_a_float32_loss_and_gradient(sample):
    embeddings, flow = sample
    half = embeddings.bfloat16().requires_grad_(True)
    loss = cross_pixel_similarity_loss(half, flow.bfloat16(), 0.1)
    loss.backward()
    assert loss.dtype == torch.float32 and half.grad.dtype == torch.bfloat16
    expected = autograd_cross_pixel_loss(half.detach().double(), flow.bfloat16().double(), 0.1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
