"""AlexNet with named taps, in two architectures (``arch``) of the same class.

``crossflow`` (default), padded like Fast R-CNN's CaffeNet (total conv stride 16); input 224 ->
conv1 11x11/4 pad 5 (96x56x56) · pool1 3x3/2 pad 1 (28) · conv2 5x5 pad 2 (256x28) · pool2 3x3/2
pad 1 (14) · conv3, conv4 3x3 pad 1 (384x14) · conv5 3x3 pad 1 (256x14) · pool5 3x3/2 (256x6x6) ·
fc6 (4096, a 6x6 convolution over pool5) · fc7 (4096, 1x1).

``torchvision``, the layers of ``torchvision.models.alexnet`` (ImageNet-supervised weights load into
it, :func:`crossflow.models.backbone.alexnet_from_torchvision`); input 224 -> conv1 11x11/4 pad 2
(64x55x55) · pool1 3x3/2 (27) · conv2 5x5 pad 2 (192x27) · pool2 3x3/2 (13) · conv3 3x3 pad 1
(384x13) · conv4, conv5 3x3 pad 1 (256x13) · pool5 3x3/2 (256x6x6) · fc6 · fc7 as above.
Torchvision puts ``AdaptiveAvgPool2d(6)`` between pool5 and its fully connected fc6; where pool5 is
6x6 (inputs of 223 to 254 px, 224 included) that pool is the identity and the two networks compute
the same. Elsewhere they differ: torchvision averages (or, below 6x6, replicates) pool5 into 6x6
bins and always gives one fc6/fc7 vector, while here fc6 slides over pool5, giving an
``(n - 5) x (n - 5)`` map for an n x n pool5 and nothing below 223 px (:meth:`AlexNet.min_input_size`).

fc6/fc7 are convolutions so the network also runs on larger images (segmentation); at 224 they
are 1x1 maps, i.e. ordinary fully connected layers. Each architecture's layer geometry (stride,
offset) and channels come from the network: :attr:`AlexNet.geometry`, :attr:`AlexNet.channels`.

With ``batch_norm=True`` a parameter-free BatchNorm (no affine) follows every conv and
fc6/fc7, before the ReLU (the pretraining network); the exported network has none.
Every tap is taken after the ReLU (or after the pooling for pool taps).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from crossflow.errors import InvalidInputError

LAYERS = ("conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5", "fc6", "fc7")
CONV_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7")
ARCHS = ("crossflow", "torchvision")


@dataclass(frozen=True)
class LayerSpec:
    kind: str  # "conv" or "pool"
    kernel: int
    stride: int
    padding: int
    in_channels: int
    out_channels: int
    groups: int = 1


def layer_specs(groups: int = 1, arch: str = "crossflow") -> "OrderedDict[str, LayerSpec]":
    """The architecture as data; ``groups=2`` splits conv2/4/5 as in CaffeNet."""
    if arch == "crossflow":
        return OrderedDict(
            conv1=LayerSpec("conv", 11, 4, 5, 3, 96),
            pool1=LayerSpec("pool", 3, 2, 1, 96, 96),
            conv2=LayerSpec("conv", 5, 1, 2, 96, 256, groups),
            pool2=LayerSpec("pool", 3, 2, 1, 256, 256),
            conv3=LayerSpec("conv", 3, 1, 1, 256, 384),
            conv4=LayerSpec("conv", 3, 1, 1, 384, 384, groups),
            conv5=LayerSpec("conv", 3, 1, 1, 384, 256, groups),
            pool5=LayerSpec("pool", 3, 2, 0, 256, 256),
            fc6=LayerSpec("conv", 6, 1, 0, 256, 4096),
            fc7=LayerSpec("conv", 1, 1, 0, 4096, 4096),
        )
    if arch == "torchvision":
        return OrderedDict(
            conv1=LayerSpec("conv", 11, 4, 2, 3, 64),
            pool1=LayerSpec("pool", 3, 2, 0, 64, 64),
            conv2=LayerSpec("conv", 5, 1, 2, 64, 192, groups),
            pool2=LayerSpec("pool", 3, 2, 0, 192, 192),
            conv3=LayerSpec("conv", 3, 1, 1, 192, 384),
            conv4=LayerSpec("conv", 3, 1, 1, 384, 256, groups),
            conv5=LayerSpec("conv", 3, 1, 1, 256, 256, groups),
            pool5=LayerSpec("pool", 3, 2, 0, 256, 256),
            fc6=LayerSpec("conv", 6, 1, 0, 256, 4096),
            fc7=LayerSpec("conv", 1, 1, 0, 4096, 4096),
        )
    raise InvalidInputError(f"unknown AlexNet arch {arch!r}; choose from {ARCHS}")


def specs_geometry(specs: "OrderedDict[str, LayerSpec]") -> dict[str, tuple[float, float]]:
    """Map each layer to ``(stride, offset)``: its feature at index ``j`` is centred on input
    pixel ``x = stride * j + offset`` (pixel centres at integer coordinates).

    For a layer of kernel k, stride s, padding p over a map with (S, O):
    ``S' = S * s`` and ``O' = O + S * ((k - 1) / 2 - p)``.
    """
    stride, offset = 1.0, 0.0
    geometry = {}
    for name, spec in specs.items():
        offset = offset + stride * ((spec.kernel - 1) / 2 - spec.padding)
        stride = stride * spec.stride
        geometry[name] = (stride, offset)
    return geometry


def specs_channels(specs: "OrderedDict[str, LayerSpec]") -> dict[str, int]:
    return {name: spec.out_channels for name, spec in specs.items()}


def specs_min_input_size(specs: "OrderedDict[str, LayerSpec]", layer: str) -> int:
    """Smallest square input side for which ``layer`` has at least one output.

    A layer (k, s, p) gives ``floor((n + 2p - k) / s) + 1 >= m`` outputs iff ``n >= (m - 1) s + k - 2p``;
    applied from ``layer`` (m = 1) back to the input.
    """
    names = list(specs)
    if layer not in names:
        raise InvalidInputError(f"unknown AlexNet layer {layer!r}; choose from {LAYERS}")
    size = 1
    for name in reversed(names[: names.index(layer) + 1]):
        spec = specs[name]
        size = max(1, (size - 1) * spec.stride + spec.kernel - 2 * spec.padding)
    return size


def layer_geometry(groups: int = 1, arch: str = "crossflow") -> dict[str, tuple[float, float]]:
    """:func:`specs_geometry` of an architecture (``AlexNet.geometry`` of a network)."""
    return specs_geometry(layer_specs(groups, arch))


def layer_channels(groups: int = 1, arch: str = "crossflow") -> dict[str, int]:
    """``{layer: output channels}`` of an architecture (``AlexNet.channels`` of a network)."""
    return specs_channels(layer_specs(groups, arch))


class Conv2dFullyConnected(nn.Conv2d):
    """A convolution that runs as a matrix product where its input is one kernel in size (fc6 and fc7 at 224 px):
    ``y = W x + b`` over the flattened ``[B, C k k]`` input, the same sum as the convolution. Written here because
    oneDNN's convolution to a 1 x 1 map is slower than the GEMM on the CPU, forward and backward (batch 96, one
    thread: fc7 0.67 s against 0.13 s, fc6 0.43 s against 0.32 s). Both are flattened in the weight's memory order
    (``c, h, w`` or, channels last, ``h, w, c``) so neither is copied. Larger inputs (segmentation) slide the kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != self.kernel_size or self.padding != (0, 0) or self.groups != 1:
            return super().forward(x)
        if self.weight.is_contiguous():
            weight, inputs = self.weight.flatten(1), x.flatten(1)
        else:  # channels last
            weight, inputs = self.weight.permute(0, 2, 3, 1).flatten(1), x.permute(0, 2, 3, 1).flatten(1)
        return F.linear(inputs, weight, self.bias)[:, :, None, None]


class AlexNet(nn.Module):
    """Fully convolutional AlexNet; ``forward(x, taps)`` returns the named activations.

    Args:
        batch_norm: parameter-free BN after each conv/fc (pretraining), or none (exported).
        groups: 1 (default) or 2 (CaffeNet's grouped conv2/4/5).
        arch: ``crossflow`` (padded like CaffeNet) or ``torchvision`` (torchvision's AlexNet layers).
    """

    def __init__(self, batch_norm: bool = False, groups: int = 1, arch: str = "crossflow"):
        super().__init__()
        self.batch_norm = batch_norm
        self.groups = groups
        self.arch = arch
        self.specs = layer_specs(groups, arch)
        self.layers = nn.ModuleDict()
        for name, spec in self.specs.items():
            if spec.kind == "pool":
                self.layers[name] = nn.MaxPool2d(spec.kernel, spec.stride, spec.padding, ceil_mode=False)
                continue
            convolution = Conv2dFullyConnected if name in ("fc6", "fc7") else nn.Conv2d
            block = OrderedDict(
                conv=convolution(spec.in_channels, spec.out_channels, spec.kernel, spec.stride, spec.padding, groups=spec.groups)
            )
            if batch_norm:
                block["bn"] = nn.BatchNorm2d(spec.out_channels, affine=False)
            block["relu"] = nn.ReLU(inplace=True)
            self.layers[name] = nn.Sequential(block)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, taps: tuple[str, ...] | list[str] = ("fc7",)) -> dict[str, torch.Tensor]:
        """x: ``[B, 3, H, W]`` normalised image -> ``{tap: [B, C, h, w]}``, stopping at the deepest tap."""
        unknown = set(taps) - set(LAYERS)
        if unknown:
            raise InvalidInputError(f"unknown AlexNet layer(s) {sorted(unknown)}; choose from {LAYERS}")
        last = max(LAYERS.index(t) for t in taps)
        outputs = {}
        for name in LAYERS[: last + 1]:
            x = self.layers[name](x)
            if name in taps:
                outputs[name] = x
        return outputs

    def conv(self, name: str) -> nn.Conv2d:
        return self.layers[name].conv

    @property
    def geometry(self) -> dict[str, tuple[float, float]]:
        """``{layer: (stride, offset)}`` of this network (:func:`specs_geometry`)."""
        return specs_geometry(self.specs)

    @property
    def channels(self) -> dict[str, int]:
        """``{layer: output channels}`` of this network."""
        return specs_channels(self.specs)

    def min_input_size(self, layer: str = "fc7") -> int:
        """Smallest square input side giving ``layer`` an output (fc6/fc7: 193 crossflow, 223 torchvision)."""
        return specs_min_input_size(self.specs, layer)
