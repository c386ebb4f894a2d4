"""Sparse hypercolumns: backbone activations sampled bilinearly at chosen pixels.

A feature at index ``j`` of a layer with geometry ``(stride, offset)`` is centred on input
pixel ``stride * j + offset`` (the network's :attr:`crossflow.models.alexnet.AlexNet.geometry`), so
input pixel ``x`` reads the layer at fractional index ``(x - offset) / stride``;
outside the map the border value is used.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn


def sample_at_points(
    features: torch.Tensor, points: torch.Tensor, stride: float, offset: float
) -> torch.Tensor:
    """Bilinear sample of ``features [B, C, h, w]`` at input pixels ``points [B, N, 2]`` (x, y).

    Returns ``[B, N, C]``.
    """
    h, w = features.shape[-2:]
    index = (points.to(features.dtype) - offset) / stride  # fractional (j_x, j_y)
    size = torch.tensor([w, h], dtype=features.dtype, device=features.device)
    grid = (2 * index + 1) / size - 1  # align_corners=False: index j -> (2j + 1) / size - 1
    sampled = F.grid_sample(features, grid.unsqueeze(1), mode="bilinear", padding_mode="border", align_corners=False)
    return sampled.squeeze(2).transpose(1, 2)


def sparse_hypercolumn(
    activations: Mapping[str, torch.Tensor],
    points: torch.Tensor,
    geometry: Mapping[str, tuple[float, float]],
    taps: list[str] | tuple[str, ...],
) -> torch.Tensor:
    """Concatenate ``taps`` sampled at ``points [B, N, 2]`` -> ``[B, N, sum(C_tap)]``.

    (Concatenated channel-first, then viewed as ``[B, N, C]``: faster than joining transposed views.)
    """
    sampled = [sample_at_points(activations[t], points, *geometry[t]).transpose(1, 2) for t in taps]
    return torch.cat(sampled, dim=1).transpose(1, 2)


def pixel_grid_chunks(height: int, width: int, chunk: int, device=None) -> Iterator[torch.Tensor]:
    """All pixel centres of an ``height x width`` image, row-major, as ``[n <= chunk, 2]`` (x, y)."""
    ys, xs = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    coords = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1).float()
    yield from coords.split(chunk)


class HypercolumnMLP(nn.Module):
    """Sparse hypercolumn -> MLP with one hidden layer (ReLU) -> ``out_dim`` values per pixel."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))

    def forward(self, hypercolumns: torch.Tensor) -> torch.Tensor:
        """``[B, N, in_dim]`` -> ``[B, N, out_dim]``."""
        return self.mlp(hypercolumns)

    def forward_at_points(
        self,
        activations: Mapping[str, torch.Tensor],
        points: torch.Tensor,
        geometry: Mapping[str, tuple[float, float]],
        taps: list[str] | tuple[str, ...],
    ) -> torch.Tensor:
        """``self(sparse_hypercolumn(activations, points, geometry, taps))`` without building the hypercolumn.

        The first layer is split by tap, ``W x = sum_t W_t x_t``; a tap whose map is a single
        position (fc6/fc7 at 224 px) is the same at every pixel, so ``W_t x_t`` is computed once
        per image instead of once per pixel (4096 of the paper's 4928 inputs). Returns ``[B, N, out_dim]``.
        """
        first = self.mlp[0]
        hidden, start = first.bias, 0
        for tap in taps:
            features = activations[tap]
            weight = first.weight[:, start : start + features.shape[1]]
            start += features.shape[1]
            if features.shape[-2:] == (1, 1):
                hidden = hidden + (features.flatten(1) @ weight.T).unsqueeze(1)
            else:
                hidden = hidden + sample_at_points(features, points, *geometry[tap]) @ weight.T
        return self.mlp[1:](hidden)

    def project_taps(
        self, activations: Mapping[str, torch.Tensor], geometry: Mapping[str, tuple[float, float]], taps: list[str] | tuple[str, ...]
    ) -> list[tuple[torch.Tensor, tuple[float, float]]]:
        """The first layer applied to each tap at the tap's own resolution (a 1x1 convolution with its slice of
        ``W``), summed over taps of equal geometry and size (conv3-5; fc6-7): ``[(map [B, hidden, h, w], (stride, offset))]``.

        Bilinear sampling is linear, so ``W [x_1; ...; x_T](p) = sum_t sample(W_t x_t)(p)``: exact.
        """
        weights = self.mlp[0].weight.split([activations[t].shape[1] for t in taps], dim=1)
        maps: dict[tuple, torch.Tensor] = {}
        for tap, weight in zip(taps, weights):
            group = (geometry[tap], activations[tap].shape[-2:])
            projection = F.conv2d(activations[tap], weight[:, :, None, None])
            maps[group] = maps[group] + projection if group in maps else projection
        return [(projection, group[0]) for group, projection in maps.items()]

    def forward_dense(
        self,
        activations: Mapping[str, torch.Tensor],
        geometry: Mapping[str, tuple[float, float]],
        taps: list[str] | tuple[str, ...],
        image_size: tuple[int, int],
        chunk: int = 4096,
    ) -> torch.Tensor:
        """The head at every pixel of the ``image_size`` input, ``chunk`` pixels at a time to bound memory: ``[B, out_dim, H, W]``.

        The same values as :meth:`forward_at_points` at each pixel, but each pixel reads the projected
        maps of :meth:`project_taps` (``hidden`` values per geometry) instead of the full hypercolumn,
        so the first layer's cost is paid at the taps' resolution, not at every pixel.
        """
        projected = self.project_taps(activations, geometry, taps)
        height, width = image_size
        batch = projected[0][0].shape[0]
        outputs = []
        for coords in pixel_grid_chunks(height, width, chunk, device=projected[0][0].device):
            points = coords.unsqueeze(0).expand(batch, -1, -1)
            hidden = self.mlp[0].bias + sum(sample_at_points(m, points, *g) for m, g in projected)
            outputs.append(self.mlp[1:](hidden))
        return torch.cat(outputs, dim=1).transpose(1, 2).reshape(batch, -1, height, width)
