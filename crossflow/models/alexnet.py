"""AlexNet padded like Fast R-CNN's CaffeNet (total conv stride 16), with named taps.

Layers (input 224 -> shapes): conv1 11x11/4 pad 5 (96x56x56) · pool1 3x3/2 pad 1 (28) ·
conv2 5x5 pad 2 (256x28) · pool2 3x3/2 pad 1 (14) · conv3, conv4 3x3 pad 1 (384x14) ·
conv5 3x3 pad 1 (256x14) · pool5 3x3/2 (256x6x6) · fc6 (4096, a 6x6 convolution over
pool5) · fc7 (4096, 1x1). fc6/fc7 are convolutions so the network also runs on larger
images (segmentation); at 224 they are 1x1 maps, i.e. ordinary fully connected layers.

With ``batch_norm=True`` a parameter-free BatchNorm (no affine) follows every conv and
fc6/fc7, before the ReLU (the pretraining network); the exported network has none.
Every tap is taken after the ReLU (or after the pooling for pool taps).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

LAYERS = ("conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5", "fc6", "fc7")
CONV_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7")


@dataclass(frozen=True)
class LayerSpec:
    kind: str  # "conv" or "pool"
    kernel: int
    stride: int
    padding: int
    in_channels: int
    out_channels: int
    groups: int = 1


def layer_specs(groups: int = 1) -> "OrderedDict[str, LayerSpec]":
    """The architecture as data; ``groups=2`` splits conv2/4/5 as in CaffeNet."""
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


def layer_geometry(groups: int = 1) -> dict[str, tuple[float, float]]:
    """Map each layer to ``(stride, offset)``: its feature at index ``j`` is centred on
    input pixel ``x = stride * j + offset`` (pixel centres at integer coordinates).

    For a layer of kernel k, stride s, padding p over a map with (S, O):
    ``S' = S * s`` and ``O' = O + S * ((k - 1) / 2 - p)``.
    """
    stride, offset = 1.0, 0.0
    geometry = {}
    for name, spec in layer_specs(groups).items():
        offset = offset + stride * ((spec.kernel - 1) / 2 - spec.padding)
        stride = stride * spec.stride
        geometry[name] = (stride, offset)
    return geometry


def layer_channels(groups: int = 1) -> dict[str, int]:
    return {name: spec.out_channels for name, spec in layer_specs(groups).items()}


class AlexNet(nn.Module):
    """Fully convolutional AlexNet; ``forward(x, taps)`` returns the named activations.

    Args:
        batch_norm: parameter-free BN after each conv/fc (pretraining), or none (exported).
        groups: 1 (default) or 2 (CaffeNet's grouped conv2/4/5).
    """

    def __init__(self, batch_norm: bool = False, groups: int = 1):
        super().__init__()
        self.batch_norm = batch_norm
        self.groups = groups
        self.specs = layer_specs(groups)
        self.layers = nn.ModuleDict()
        for name, spec in self.specs.items():
            if spec.kind == "pool":
                self.layers[name] = nn.MaxPool2d(spec.kernel, spec.stride, spec.padding, ceil_mode=False)
                continue
            block = OrderedDict(
                conv=nn.Conv2d(spec.in_channels, spec.out_channels, spec.kernel, spec.stride, spec.padding, groups=spec.groups)
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
            raise ValueError(f"unknown AlexNet layer(s) {sorted(unknown)}; choose from {LAYERS}")
        last = max(LAYERS.index(t) for t in taps)
        outputs = {}
        for name in LAYERS[: last + 1]:
            x = self.layers[name](x)
            if name in taps:
                outputs[name] = x
        return outputs

    def conv(self, name: str) -> nn.Conv2d:
        return self.layers[name].conv
