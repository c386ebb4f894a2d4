"""Kraehenbuehl et al.'s data-dependent rescaling of a random network (the "Random-rescaled" row).

Kraehenbuehl, Doersch, Donahue, Darrell, "Data-dependent Initializations of Convolutional Neural
Networks", ICLR 2016 (their code: philkr/magic_init). Both steps keep the directions of the random
weights (here our AlexNet's Gaussian initialisation, biases 0) and only rescale them and set the
biases, from a sample of real training images and no labels. ``images`` are normalised
``[3, H, W]`` tensors of any sizes: images of equal size are batched together, and statistics
pool every position of every image. A layer that no image reaches (fc6/fc7 below 193 px) is left
as it is, and so are the layers after it.

**Within-layer** (their Algorithm 1; magic_init's ``initializeLayer`` with Gaussian weights). For
each conv layer k = conv1, ..., fc7 in order, let ``z_k = W_k * x_{k-1} + b_k`` be its
pre-activation (before the ReLU) on the images, with ``x_{k-1}`` computed by the layers below as
already rescaled, and ``mu_i``, ``sigma_i`` the mean and (population) standard deviation of
channel i of ``z_k`` over all images and positions. Then, per output channel::

    W_{k,i} <- W_{k,i} / sigma_i,        b_{k,i} <- (b_{k,i} - mu_i) / sigma_i

so that every channel's pre-activation has mean 0 and variance 1 on the images. With zero initial
biases the result does not depend on the scale of the initial weights, so this is magic_init's
Gaussian ("elwise") initialisation. magic_init's command line also adds 0.1 to every bias by
default (``-b``); that offset is left out here (target mean 0). A channel that is constant on
the images (sigma = 0) is only centred.

**Between-layer** (their Algorithm 2; magic_init's ``calibrateGradientRatio``, option ``-cs``):
make SGD change every layer at the same relative rate. With a random backward signal
``g ~ N(0, 1)`` at the output of the last layer K (after its ReLU) on ``BETWEEN_LAYER_IMAGES``
images (magic_init: one batch of 16), the change rate of layer k is
``C_k = rms(dL/dW_k) / rms(W_k)`` for ``L = <g, x_K>``, and ``s`` is the mean over channels of
the output's standard deviation. Up to ``BETWEEN_LAYER_ITERATIONS`` (10) times, with a new g each time::

    C = exp(mean_k log C_k) * s ** (1 / K)            the target rate
    stop if |log C_k / log C - 1| < 0.01 for every k
    r_k = sqrt(C_k / C);   W_k <- r_k W_k;   b_k <- (r_1 ... r_k) b_k

ReLU, max pooling and zero padding are positively homogeneous, so after the update layer k's input
is scaled by ``r_1 ... r_{k-1}`` and its pre-activation by ``r_1 ... r_k`` (magic_init measures
that input factor from mean absolute activations; here it is exact). Hence every ``C_k`` becomes
``C * r_1 ... r_K``, equal across layers, and within each layer the channels keep mean 0 and a
common standard deviation ``r_1 ... r_k``. K is 7 here (conv1..fc7: the backbone has no fc8,
the evals add their own heads after this), or the number of layers the images reach. Since g is
random, the measured ``C_k`` are noisy and the 1% rule seldom stops the loop early; one update
already brings them within about 10-20% of each other (measured with a new g). ``C_k`` is the
RMS ratio of magic_init's latest version (an earlier one used mean absolute values).

**Re-balancing a trained network** (:func:`rebalance`): magic_init run on a pretrained model (``-l FILE -cs``)
re-initialises no trained layer and applies only the between-layer step, the "re-balancing trick" that the
cross-pixel paper reports its results without (an eval's ``rebalance: true``).

Not done here: magic_init's data-dependent *weights* (its PCA and k-means variants, other rows of
their tables) and its empirical correction for non-homogeneous layers (LRN), which this AlexNet lacks.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from crossflow.models.alexnet import CONV_LAYERS, LAYERS, AlexNet, LayerSpec

BETWEEN_LAYER_IMAGES = 16  # magic_init's between-layer step runs on one batch (-bs 16)
BETWEEN_LAYER_ITERATIONS = 10
CONVERGED = 0.01  # magic_init's stopping rule: every |log C_k / log C - 1| below this


def data_dependent_rescale(network: AlexNet, images: Sequence[Tensor], seed: int = 0) -> list[str]:
    """Within-layer then between-layer rescaling of ``network`` (in place) on ``images``.

    The between-layer step uses the first ``BETWEEN_LAYER_IMAGES`` images that reach the last
    rescaled layer; ``seed`` fixes its random backward signals. Returns the rescaled layers.
    """
    layers = rescale_within_layers(network, images)
    rebalance(network, images, layers, seed)
    return layers


def rebalance(network: AlexNet, images: Sequence[Tensor], layers: Sequence[str] | None = None, seed: int = 0) -> list[str]:
    """The between-layer step alone on ``network`` in place: Kraehenbuehl et al.'s "re-balancing" of a trained
    network (magic_init ``-l FILE -cs``: a loaded network's layers are not re-initialised, only calibrated).

    ``layers``: conv1 up to the deepest layer any image reaches (default); the step runs on the first
    ``BETWEEN_LAYER_IMAGES`` images that reach the last of them, ``seed`` fixing its random backward signals. Every
    channel keeps its function up to one positive factor per layer (ReLU and max pooling are positively
    homogeneous). Returns the layers calibrated.
    """
    if layers is None:
        largest = max((min(image.shape[-2:]) for image in images), default=0)
        layers = [name for name in CONV_LAYERS if network.min_input_size(name) <= largest]
    if layers:
        deepest = network.min_input_size(layers[-1])
        reaching = [image for image in images if min(image.shape[-2:]) >= deepest][:BETWEEN_LAYER_IMAGES]
        rescale_between_layers(network, reaching, layers, torch.Generator().manual_seed(seed), BETWEEN_LAYER_ITERATIONS)
    return list(layers)


@torch.no_grad()
def rescale_within_layers(network: AlexNet, images: Sequence[Tensor], only: Collection[str] | None = None) -> list[str]:
    """Algorithm 1 (module docstring) on ``network`` in place; returns the conv layers rescaled, in order.
    With ``only``, just those conv layers are rescaled; the others keep their weights and pass their outputs on."""
    if network.batch_norm:
        raise ValueError("data-dependent rescaling needs an AlexNet without batch norm (as load_backbone returns)")
    maps, rescaled = batches_by_size(images), []
    for name in LAYERS:
        spec = network.specs[name]
        maps = [x for x in maps if reaches(x, spec)]
        if not maps:
            break
        if spec.kind == "pool":
            maps = [network.layers[name](x) for x in maps]
            continue
        conv = network.conv(name)
        if only is not None and name not in only:
            maps = [network.layers[name](x) for x in maps]
            continue
        pre = [conv(x) for x in maps]
        mean, std = channel_moments(pre)
        scale = torch.where(std > 0, 1 / std, torch.ones_like(std))
        conv.weight.copy_(conv.weight.double() * scale.view(-1, 1, 1, 1))
        conv.bias.copy_((conv.bias.double() - mean) * scale)
        mean, scale = mean.to(pre[0].dtype).view(1, -1, 1, 1), scale.to(pre[0].dtype).view(1, -1, 1, 1)
        maps = [F.relu_(z.sub_(mean).mul_(scale)) for z in pre]  # = the rescaled layer's output, without recomputing it
        rescaled.append(name)
    return rescaled


def rescale_between_layers(
    network: AlexNet, images: Sequence[Tensor], layers: Sequence[str], generator: torch.Generator | None = None,
    iterations: int = BETWEEN_LAYER_ITERATIONS,
) -> None:
    """Algorithm 2 (module docstring) on ``network`` in place, over the conv ``layers`` (conv1 up to the last one
    the ``images`` reach, as :func:`rescale_within_layers` returns them)."""
    batches = batches_by_size(images)
    for _ in range(iterations):
        rates, output_std = change_rates(network, batches, layers, generator)
        log_rates = [math.log(rates[name]) for name in layers]
        log_target = (sum(log_rates) + math.log(output_std)) / len(layers)
        if all(abs(log_rate / log_target - 1) < CONVERGED for log_rate in log_rates):
            return
        cumulative = 1.0
        with torch.no_grad():
            for name, log_rate in zip(layers, log_rates):
                factor = math.exp((log_rate - log_target) / 2)  # r_k = sqrt(C_k / C)
                cumulative *= factor
                network.conv(name).weight.mul_(factor)
                network.conv(name).bias.mul_(cumulative)


def change_rates(
    network: AlexNet, batches: Sequence[Tensor], layers: Sequence[str], generator: torch.Generator | None = None
) -> tuple[dict[str, float], float]:
    """``({layer: rms(dL/dW) / rms(W)}, s)`` for ``L = <g, x_K>``, ``g ~ N(0, 1)`` drawn from ``generator`` at the
    output ``x_K`` of ``layers[-1]`` (after its ReLU), summed over ``batches [B, 3, H, W]``; ``s`` is the mean over
    channels of ``x_K``'s standard deviation. The network's own ``requires_grad`` flags are left alone."""
    last = layers[-1]
    weights = {f"layers.{name}.conv.weight": network.conv(name).weight.detach().requires_grad_() for name in layers}
    gradients = {key: torch.zeros_like(weight) for key, weight in weights.items()}
    outputs = []
    with torch.enable_grad():
        for x in batches:
            output = torch.func.functional_call(network, weights, (x,), {"taps": (last,)})[last]
            signal = torch.randn(output.shape, generator=generator, dtype=output.dtype).to(output.device)
            for key, gradient in zip(weights, torch.autograd.grad(output, list(weights.values()), signal)):
                gradients[key] += gradient
            outputs.append(output.detach())
    rates = {name: float(rms(gradients[key]) / rms(weights[key].detach())) for name, key in zip(layers, weights)}
    return rates, float(channel_moments(outputs)[1].mean())


def rms(tensor: Tensor) -> Tensor:
    return tensor.double().square().mean().sqrt()


def batches_by_size(images: Sequence[Tensor]) -> list[Tensor]:
    """``[3, H, W]`` images -> ``[B, 3, H, W]`` batches of equal-sized images, in order of first appearance."""
    groups: dict[tuple[int, ...], list[Tensor]] = {}
    for image in images:
        groups.setdefault(tuple(image.shape), []).append(image)
    return [torch.stack(group) for group in groups.values()]


def reaches(x: Tensor, spec: LayerSpec) -> bool:
    """Whether the layer has an output for maps ``x [B, C, h, w]``: ``floor((n + 2p - k) / s) + 1 >= 1`` both ways."""
    return min(x.shape[-2:]) + 2 * spec.padding >= spec.kernel


def channel_moments(maps: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-channel mean and population standard deviation ``[C]`` (float64) over every image and position of
    ``maps``, a list of ``[B, C, h, w]`` of any spatial sizes: each map's ``(n_g, mu_g, var_g)`` pooled as
    ``mu = sum n_g mu_g / N``, ``var = sum n_g (var_g + (mu_g - mu)^2) / N``."""
    stats = [(x.shape[0] * x.shape[2] * x.shape[3], *torch.var_mean(x, dim=(0, 2, 3), correction=0)) for x in maps]
    count = sum(n for n, _, _ in stats)
    mean = sum(n * m.double() for n, _, m in stats) / count
    var = sum(n * (v.double() + (m.double() - mean).square()) for n, v, m in stats) / count
    return mean, var.sqrt()
