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


def bilinear_neighbours(
    points: torch.Tensor, stride: float, offset: float, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The four units :func:`sample_at_points` reads around each point, and their weights.

    ``points [B, N, 2]`` -> ``indices [B N, 4]`` into the ``B h w`` units of a batch of maps (row-major, image by image)
    and ``weights [B N, 4]``: ``(1 - a)(1 - b), a (1 - b), (1 - a) b, a b`` for the fractional index's offsets ``(a, b)``
    from its top-left unit; the index is clamped to the map (the border padding), where a neighbour repeats.
    """
    index = (points - offset) / stride
    x, y = index[..., 0].clamp(0, width - 1), index[..., 1].clamp(0, height - 1)
    left, top = x.floor(), y.floor()
    a, b = x - left, y - top
    left, top = left.long(), top.long()
    right, bottom = (left + 1).clamp(max=width - 1), (top + 1).clamp(max=height - 1)
    first_unit = (torch.arange(points.shape[0], device=points.device) * (height * width)).view(-1, 1, 1)
    indices = torch.stack([top * width + left, top * width + right, bottom * width + left, bottom * width + right], -1)
    weights = torch.stack([(1 - a) * (1 - b), a * (1 - b), (1 - a) * b, a * b], -1)
    return (indices + first_unit).flatten(0, 1), weights.flatten(0, 1)


def sample_channels_last(features: torch.Tensor, points: torch.Tensor, stride: float, offset: float) -> torch.Tensor:
    """:func:`sample_at_points` for channels-last ``features [B, h, w, C]``: ``[B, N, C]``, each point a weighted sum of
    four rows by one ``embedding_bag``. On the CPU its forward + backward is 3x faster than a bilinear matmul and than
    grid_sample at the head's projected conv3 map (B 96, N 512, 1024 channels, 14 x 14: 0.24 s against 0.62 s)."""
    return sample_maps([(features, (stride, offset))], points)


def to_channels_last(features: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B, h, w, C]``, a view where ``features`` is channels last in memory (else a copy)."""
    return features.permute(0, 2, 3, 1).contiguous()


def pointwise_linear(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``W x`` at every position of channels-last ``features [..., C]`` with ``weight [H, C]``: ``[..., H]``.

    Run as a 1 x 1 convolution over a channels-last ``[B, C, h, w]`` view (oneDNN on the CPU, cuDNN on CUDA), which is
    1.5x faster than the same product by ``torch.mm`` or ``bmm`` (MKL) on the project's AMD EPYC host, forward and backward
    (the paper's sample-first layer, 49152 x 192 -> 1024: 0.47 s against 0.68 s); a 1 x 1 map is one ``F.linear``.
    """
    if features.dim() == 4 and features.shape[1:3] == (1, 1):
        return F.linear(features, weight)
    images = features.reshape(features.shape[0], 1, -1, features.shape[-1]) if features.dim() == 3 else features
    output = F.conv2d(images.permute(0, 3, 1, 2), weight[:, :, None, None]).permute(0, 2, 3, 1)
    return output.reshape(*features.shape[:-1], weight.shape[0])


def sample_maps(maps: list[tuple[torch.Tensor, tuple[float, float]]], points: torch.Tensor) -> torch.Tensor:
    """``sum_m sample(map_m)`` at ``points [B, N, 2]`` for channels-last ``maps [(map [B, h_m, w_m, H], (stride, offset))]``:
    ``[B, N, H]``, by one ``embedding_bag`` over the maps' stacked rows whose bag for a point holds its four neighbours in
    every map (:func:`bilinear_neighbours`), so the ``[B, N, H]`` result is written once, not once per map."""
    tables, indices, weights, first_row = [], [], [], 0
    for features, (stride, offset) in maps:
        batch, height, width, channels = features.shape
        neighbours, neighbour_weights = bilinear_neighbours(points, stride, offset, height, width)
        if height == width == 1:  # the four neighbours are the image's one unit (fc6/fc7, the bias): read it once
            neighbours, neighbour_weights = neighbours[:, :1], neighbour_weights.sum(1, keepdim=True)
        tables.append(features.reshape(-1, channels).to(maps[0][0].dtype))  # a float32 bias joins bf16 maps under autocast
        indices.append(neighbours + first_row)
        weights.append(neighbour_weights)
        first_row += batch * height * width
    rows = torch.cat(tables) if len(tables) > 1 else tables[0]
    sampled = F.embedding_bag(torch.cat(indices, 1), rows, per_sample_weights=torch.cat(weights, 1).to(rows.dtype), mode="sum")
    return sampled.view(*points.shape[:2], rows.shape[1])


def bias_map(bias: torch.Tensor, batch: int) -> tuple[torch.Tensor, tuple[float, float]]:
    """A bias ``[H]`` as a 1 x 1 map per image for :func:`sample_maps` (every point reads it with weight 1)."""
    return bias.expand(batch, 1, 1, -1), (1.0, 0.0)


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


def project_first(shape: torch.Size | tuple[int, ...], num_points: int, hidden_dim: int) -> bool:
    """Whether a tap ``[B, C, h, w]`` is cheaper projected to ``hidden_dim`` at its own resolution then sampled at
    ``num_points`` pixels than sampled then projected: ``h w C H + 4 N H < N C H + 4 N C`` per image (multiply-adds,
    and four bilinear taps per sampled value)."""
    channels, height, width = shape[1], shape[2], shape[3]
    project = height * width * channels * hidden_dim + 4 * num_points * hidden_dim
    sample = num_points * channels * hidden_dim + 4 * num_points * channels
    return project < sample


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

        The first layer is split by tap, ``W x = sum_t W_t x_t``, and bilinear sampling is linear, so each tap
        is either sampled at the N points then projected (``N C_t`` values sampled, ``N C_t H`` multiply-adds) or
        projected at its own ``h x w`` resolution then sampled (``h w C_t H`` multiply-adds, ``N H`` sampled),
        whichever :func:`project_first` says is cheaper: at 224 px and N = 512, conv1 and pool1 sample first
        (one product by :func:`pointwise_linear`), conv3 and pool5 project first, and a 1 x 1 map (fc6/fc7) is
        projected once per image; the projected maps and the bias are sampled together by :func:`sample_maps`.
        Exact (up to float rounding). Returns ``[B, N, out_dim]``.
        """
        first = self.mlp[0]
        weights = self._first_layer_by_tap(activations, taps)
        sampled = [t for t in taps if not project_first(activations[t].shape, points.shape[1], first.out_features)]
        projected = self._projected_maps(activations, geometry, [t for t in taps if t not in sampled], weights)
        hidden = sample_maps([*projected, bias_map(first.bias, points.shape[0])], points)
        if sampled:  # one matmul for all sample-first taps
            columns = torch.cat([sample_channels_last(to_channels_last(activations[t]), points, *geometry[t]) for t in sampled], dim=-1)
            hidden = pointwise_linear(columns, torch.cat([weights[t] for t in sampled], dim=1)) + hidden.to(columns.dtype)
        return self.mlp[1:](hidden)

    def _first_layer_by_tap(self, activations: Mapping[str, torch.Tensor], taps: list[str] | tuple[str, ...]) -> dict[str, torch.Tensor]:
        """The first layer's weight split into its columns per tap, in the hypercolumn's order: ``{tap: [hidden, C_tap]}``."""
        return dict(zip(taps, self.mlp[0].weight.split([activations[t].shape[1] for t in taps], dim=1)))

    @staticmethod
    def _projected_maps(activations, geometry, taps, weights) -> list[tuple[torch.Tensor, tuple[float, float]]]:
        """``W_t x_t`` per tap as a 1x1 convolution, summed over taps of equal geometry and size, channels last:
        ``[(map [B, h, w, hidden], (stride, offset))]`` (a channels-last convolution is also the faster one on the CPU)."""
        maps: dict[tuple, torch.Tensor] = {}
        for tap in taps:
            group = (tuple(geometry[tap]), tuple(activations[tap].shape[-2:]))
            projection = pointwise_linear(to_channels_last(activations[tap]), weights[tap])
            maps[group] = maps[group] + projection if group in maps else projection
        return [(projection, group[0]) for group, projection in maps.items()]

    def project_taps(
        self, activations: Mapping[str, torch.Tensor], geometry: Mapping[str, tuple[float, float]], taps: list[str] | tuple[str, ...]
    ) -> list[tuple[torch.Tensor, tuple[float, float]]]:
        """The first layer applied to each tap at the tap's own resolution (a 1x1 convolution with its slice of
        ``W``), summed over taps of equal geometry and size (conv3-5; fc6-7): ``[(map [B, h, w, hidden], (stride, offset))]``.

        Bilinear sampling is linear, so ``W [x_1; ...; x_T](p) = sum_t sample(W_t x_t)(p)``: exact.
        """
        return self._projected_maps(activations, geometry, taps, self._first_layer_by_tap(activations, taps))

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
            outputs.append(self.mlp[1:](sample_maps([*projected, bias_map(self.mlp[0].bias, batch)], points)))
        return torch.cat(outputs, dim=1).transpose(1, 2).reshape(batch, -1, height, width)
