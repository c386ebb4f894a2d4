"""Diagnostics of issue 12: the sampled points land where the hypercolumn reads every tap.

tests/test_models.py checks the receptive-field centre of the middle unit of conv1..pool5 at 224 px and
sampling at feature centres at 224 px; here every unit of every tap (fc6/fc7 included), at the paper's
224 px and the demo's 128 px, and fractional points, with the points drawn as crossflow.data.pairs draws them.

The reference is the definition of a unit's centre: unit ``j`` of a layer with kernel k, stride s, padding p
looks at the previous map's indices ``s j - p .. s j - p + k - 1`` (padding included), whose middle is
``s j - p + (k - 1) / 2``; composed down to the input, that is the unit's centre in input pixels. A network
that carries the input pixel's coordinates through its centre taps (each conv and each pool replaced by a
same-window operator that reads its window's middle) computes exactly that at every unit.
"""

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from crossflow.data.pairs import sample_points
from crossflow.models import AlexNet, LAYERS, layer_geometry, sample_at_points
from crossflow.models.alexnet import layer_specs
from crossflow.models.hypercolumn import sparse_hypercolumn

LIFT = 1.0  # coordinates + LIFT stay positive, so the ReLUs pass them unchanged
PAPER_TAPS, DEMO_TAPS = ("conv1", "pool1", "conv3", "pool5", "fc7"), ("conv1", "pool1", "conv3", "pool5")


def middle_taps(kernel: int) -> torch.Tensor:
    """``[k, k]`` weights reading a window's middle: 1 there (odd k), 1/4 on the four middle entries (even k)."""
    line = torch.zeros(kernel)
    line[(kernel - 1) // 2] += 0.5
    line[kernel // 2] += 0.5
    return torch.outer(line, line)


class MiddleReader(nn.Module):
    """A pool's window (kernel, stride, padding from the real MaxPool2d) reading its middle, per channel."""

    def __init__(self, pool: nn.MaxPool2d):
        super().__init__()
        assert not pool.ceil_mode and pool.dilation == 1
        self.kernel, self.stride, self.padding = pool.kernel_size, pool.stride, pool.padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = middle_taps(self.kernel).to(x)[None, None].expand(x.shape[1], 1, -1, -1)
        return F.conv2d(x, weight, stride=self.stride, padding=self.padding, groups=x.shape[1])


def coordinate_network(arch: str = "crossflow") -> AlexNet:
    """AlexNet whose every tap holds ``LIFT + x`` in channel 0 and ``LIFT + y`` in channel 1 of the
    centre of each unit: the real convolutions with middle-tap identity weights on channels 0 and 1, pools swapped
    for :class:`MiddleReader` of the same window."""
    network = AlexNet(arch=arch)
    for name in LAYERS:
        layer = network.layers[name]
        if isinstance(layer, nn.MaxPool2d):
            network.layers[name] = MiddleReader(layer)
            continue
        conv = layer.conv
        assert conv.groups == 1
        with torch.no_grad():
            conv.weight.zero_()
            conv.bias.zero_()
            for channel in (0, 1):
                conv.weight[channel, channel] = middle_taps(conv.kernel_size[0])
    return network


@functools.lru_cache(maxsize=None)
def coordinate_taps(size: int, arch: str = "crossflow") -> dict[str, torch.Tensor]:
    """Every layer of :func:`coordinate_network` that a ``size`` square input reaches: ``{layer: [1, C, h, w]}``."""
    network = coordinate_network(arch)
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    image = torch.stack([x + LIFT, y + LIFT, torch.zeros_like(x)])[None]
    with torch.no_grad():
        return network(image, [name for name in LAYERS if network.min_input_size(name) <= size])


def centres(size: int, arch: str, layer: str) -> np.ndarray:
    """Input-pixel centre of every unit along one axis of ``layer`` for a ``size`` input, composed from each
    layer's window ``s j - p .. s j - p + k - 1`` (this definition, not the closed-form stride/offset)."""
    specs = list(layer_specs(arch=arch).items())
    positions = np.arange(size, dtype=np.float64)  # centre of each unit of the current map, in input pixels
    for name, spec in specs[: [n for n, _ in specs].index(layer) + 1]:
        spacing = positions[1] - positions[0] if len(positions) > 1 else 0.0
        padded = positions[0] + spacing * np.arange(-spec.padding, len(positions) + spec.padding)  # the map, padding included
        assert np.array_equal(padded[spec.padding : spec.padding + len(positions)], positions)  # the map is uniform
        count = (len(padded) - spec.kernel) // spec.stride + 1
        middle = np.arange(count) * spec.stride + (spec.kernel - 1) / 2  # index of each window's middle in ``padded``
        positions = (padded[np.floor(middle).astype(int)] + padded[np.ceil(middle).astype(int)]) / 2
    return positions


def crossflow_points(size: int, rng: np.random.Generator) -> torch.Tensor:
    """Points as crossflow.data.pairs draws them (pixel centres (x, y) of a ``size`` crop, here among the valid
    pixels of a mask that is not symmetric in x and y), the same points moved by up to half a pixel, and the corners."""
    valid = np.zeros((size, size), bool)
    valid[: size // 3, :] = True  # a band along the top: x spans the crop, y only its upper third
    valid[:, -5:] = True  # and a strip at the right edge, down to the bottom border
    integer = sample_points(valid, 256, rng)
    assert valid[integer[:, 1].astype(int), integer[:, 0].astype(int)].all()  # (x, y) = (column, row)
    fractional = np.clip(integer + rng.uniform(-0.5, 0.5, integer.shape), 0, size - 1)
    corners = np.array([[0, 0], [size - 1, 0], [0, size - 1], [size - 1, size - 1]])
    return torch.from_numpy(np.concatenate([integer, fractional, corners]).astype(np.float32))[None]


@pytest.mark.parametrize("arch", ["crossflow", "torchvision"])
@pytest.mark.parametrize("size", [224, 128])
def test_every_unit_of_every_tap_holds_its_receptive_field_centre(size, arch):
    activations = coordinate_taps(size, arch)
    geometry = layer_geometry(arch=arch)
    assert list(activations) == (list(LAYERS) if size == 224 else list(LAYERS[:-2]))  # fc6/fc7 need 193 (223) px
    for layer, features in activations.items():
        expected = centres(size, arch, layer)
        stride, offset = geometry[layer]
        assert features.shape[-2:] == (len(expected), len(expected)), layer
        np.testing.assert_array_equal(stride * np.arange(len(expected)) + offset, expected, err_msg=layer)
        np.testing.assert_array_equal(features[0, 0].numpy(), LIFT + np.tile(expected, (len(expected), 1)), err_msg=layer)
        np.testing.assert_array_equal(features[0, 1].numpy(), LIFT + np.tile(expected[:, None], (1, len(expected))), err_msg=layer)


@pytest.mark.parametrize("size, taps", [(224, LAYERS), (224, PAPER_TAPS), (128, DEMO_TAPS)])
def test_pairs_points_read_each_tap_at_their_own_position(size, taps):
    """Sampling a tap at point p gives the tap's value at p: with taps holding their units' centres, the
    sampled value is p itself, bilinearly between centres, clamped to the outermost centres beyond them."""
    activations = {tap: coordinate_taps(size)[tap] for tap in taps}
    geometry = layer_geometry()
    points = crossflow_points(size, np.random.default_rng(size))
    columns = sparse_hypercolumn(activations, points, geometry, taps)[0]  # [N, sum C]
    start = 0
    for tap in taps:
        expected = centres(size, "crossflow", tap)
        clamped = torch.clamp(points[0], float(expected[0]), float(expected[-1]))
        torch.testing.assert_close(columns[:, start : start + 2], LIFT + clamped, rtol=0, atol=1e-4, msg=tap)
        channels = activations[tap].shape[1]
        assert torch.equal(sample_at_points(activations[tap], points, *geometry[tap])[0], columns[:, start : start + channels])
        start += channels
