"""Shards of (frame, flow) pairs -> augmented training batches: the pretraining DataModule.

Reads the layout `crossflow prepare` writes (``DIR/index.json`` and WebDataset tars whose
samples hold ``<key>.frame.jpg``, the flow in one of :data:`crossflow.flow.FLOW_MEMBERS` (``<key>.flow.u8.lz4``,
``.flow.i16.zst`` or ``.flow.png``, KITTI 16-bit: prepare's ``--flow-format``), ``<key>.meta.json``).
The tars are read by random access through an index of member offsets rather than as
a stream: that gives exact epochs under DDP (Lightning's DistributedSampler), validation
seen exactly once, and augmentation that is a pure function of (seed, epoch, sample) so a
run is reproducible. The offsets come from ``<shard>.members.json`` (written by prepare, or
at the first read; rebuilt when the shard's size or mtime changed). A batch is a dict:

    image  [B, 3, S, S]  float, normalised with IMAGE_MEAN / IMAGE_STD
    points [B, N, 2]     float (x, y) pixel centres of the crop, drawn per image among valid flow
    flow   [B, N, 2]     float, eq. 6 normalised flow at those pixels
    key    list of B sample keys

With ``augment_on_device``, workers send each sample's stored pixels under the crop instead of ``image``
(``window [B, h, w, 3]`` uint8, ``matrix [B, 2, 3]``, see :func:`cut_window`) and the DataModule warps the batch on
the device as it arrives (:func:`warp_windows`), so the CPU does no per-pixel work on the frame.
"""

from __future__ import annotations

import json
import tarfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, default_collate

from crossflow.data.resumable import ResumableLoader
from crossflow.errors import InvalidInputError, MissingInputError
from crossflow.files import write_text_atomic
from crossflow.flow import FLOW_MEMBERS, QuantisedFlow, decode_flow_member, normalize_flow
from crossflow.models.backbone import IMAGE_MEAN, IMAGE_STD

PAIRS_FORMAT = "crossflow-pairs"
MEMBERS = ("frame.jpg", *FLOW_MEMBERS)  # spans: the frame, then each flow format (absent: -1)


def read_index(data_dir: str | Path) -> dict:
    """``DIR/index.json`` with a one-line error naming the command that makes it."""
    path = Path(data_dir) / "index.json"
    if not path.is_file():
        raise MissingInputError(
            f"no prepared pairs at {data_dir} (missing {path}): make them with "
            f"`crossflow prepare VIDEOS... --out {data_dir}` (or `make pretrain` for the synthetic demo)"
        )
    index = json.loads(path.read_text())
    if index.get("format") != PAIRS_FORMAT:
        raise InvalidInputError(f"{path} is not a crossflow pairs index (format {index.get('format')!r})")
    return index


@dataclass(frozen=True)
class CropTransform:
    """One sample's scale, crop and flip as a map from crop pixels to stored pixels (axis-aligned, so separable).

    The stored ``[H, W]`` field is notionally resized by ``scale = (s_x, s_y)`` (cv2.resize's pixel-centre
    convention), cropped at ``(left, top)`` to ``size`` pixels and mirrored when ``flip``. Crop pixel
    ``(x, y)`` then reads stored pixel ``x_s = (left + x' + 0.5) / s_x - 0.5`` with ``x' = size - 1 - x``
    on a flip, else ``x``; ``y_s = (top + y + 0.5) / s_y - 0.5``. Flow vectors scale by ``(s_x, s_y)``, u negated on a flip.
    """

    stored_shape: tuple[int, int]
    scale: tuple[float, float]
    left: int
    top: int
    size: int
    flip: bool

    def source_x(self, x: np.ndarray) -> np.ndarray:
        """Crop x -> stored x (float64)."""
        x = (self.size - 1 - x) if self.flip else x
        return (self.left + x + 0.5) / self.scale[0] - 0.5

    def source_y(self, y: np.ndarray) -> np.ndarray:
        """Crop y -> stored y (float64)."""
        return (self.top + y + 0.5) / self.scale[1] - 0.5

    def matrix(self) -> np.ndarray:
        """``[2, 3]`` affine crop -> stored pixel, for ``cv2.warpAffine(..., WARP_INVERSE_MAP)``."""
        ax, bx = self.source_x(np.float64(1)) - self.source_x(np.float64(0)), self.source_x(np.float64(0))
        return np.array([[ax, 0, bx], [0, 1 / self.scale[1], self.source_y(np.float64(0))]])

    def vector_scale(self) -> np.ndarray:
        """``[2]`` factors applied to stored flow vectors (u, v)."""
        return np.array([-self.scale[0] if self.flip else self.scale[0], self.scale[1]], np.float32)


def _neighbours(coords: np.ndarray, length: int | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps along one axis of ``length`` (or axes: ``length`` broadcast against ``coords``): (i0, i1, w) with
    value ``(1 - w) f[i0] + w f[i1]``; coordinates clamped to the border as cv2.resize does, and ``i1 = i0`` where
    ``w = 0`` (so a tap of zero weight is never read)."""
    coords = np.clip(coords, 0, length - 1)
    i0 = np.floor(coords).astype(np.intp)
    weight = (coords - i0).astype(np.float32)
    return i0, np.minimum(i0 + (weight > 0), length - 1), weight


def crop_valid(valid: np.ndarray, transform: CropTransform) -> np.ndarray:
    """``[S, S]`` bool: crop pixels whose bilinear taps in the stored ``valid [H, W]`` are all valid."""
    size = transform.size
    if valid.all():
        return np.ones((size, size), bool)
    x0, x1, _ = _neighbours(transform.source_x(np.arange(size, dtype=np.float64)), valid.shape[1])
    y0, y1, _ = _neighbours(transform.source_y(np.arange(size, dtype=np.float64)), valid.shape[0])
    rows0, rows1 = valid[y0], valid[y1]
    return rows0[:, x0] & rows0[:, x1] & rows1[:, x0] & rows1[:, x1]


def flow_at(flow: np.ndarray | QuantisedFlow, transform: CropTransform, points: np.ndarray) -> np.ndarray:
    """Flow of the transformed crop at crop pixels ``points [N, 2]`` (x, y) -> ``[N, 2]`` pixels, read bilinearly
    from the stored ``flow [H, W, 2]`` (or its :class:`QuantisedFlow`: only the taps are dequantised) and scaled
    (u negated on a flip). Own gather rather than cv2.remap, which rounds positions to 1/32 px."""
    xs, ys = points.T.astype(np.float64)
    # both axes in one pass, and the four taps of every point in one gather, as component planes [2, 4 N]: NumPy's
    # per-call cost, not the arithmetic, is what N = 512 points spend their time on
    (x0, y0), (x1, y1), (wx, wy) = _neighbours(np.stack([transform.source_x(xs), transform.source_y(ys)]),
                                               np.array([[flow.shape[1]], [flow.shape[0]]]))
    taps = flow[np.concatenate([y0, y0, y1, y1]), np.concatenate([x0, x1, x0, x1])].T
    f00, f01, f10, f11 = taps.reshape(2, 4, len(points)).transpose(1, 0, 2)
    top = f00 * (1 - wx) + f01 * wx
    bottom = f10 * (1 - wx) + f11 * wx
    return np.ascontiguousarray(((top * (1 - wy) + bottom * wy) * transform.vector_scale()[:, None]).T)


def all_pixels(size: int) -> np.ndarray:
    """Every pixel centre of a ``size`` square crop, row-major: ``[size * size, 2]`` (x, y) float32."""
    ys, xs = np.divmod(np.arange(size * size), size)
    return np.stack([xs, ys], axis=-1).astype(np.float32)


def cut_window(frame: np.ndarray, transform: CropTransform) -> tuple[np.ndarray, np.ndarray]:
    """The stored pixels a crop's bilinear taps read: (``frame[y0:y1, x0:x1]`` [h, w, 3], ``[2, 3]`` float32 affine
    crop pixel -> window pixel). Border replication needs no pixel outside: taps are clamped into the frame."""
    ends = np.float64([0, transform.size - 1])
    x0, x1 = np.clip(np.floor(np.sort(transform.source_x(ends))), 0, frame.shape[1] - 1).astype(int)
    y0, y1 = np.clip(np.floor(transform.source_y(ends)), 0, frame.shape[0] - 1).astype(int)
    matrix = transform.matrix() - np.array([[0, 0, x0], [0, 0, y0]])
    return frame[y0:y1 + 2, x0:x1 + 2], matrix.astype(np.float32)


def pad_windows(windows: list[np.ndarray]) -> torch.Tensor:
    """Windows of different sizes -> ``[B, h, w, 3]`` uint8, each padded at its bottom and right by repeating its
    edge (so border clamping in :func:`warp_windows` replicates the same pixels as the frame's own border). Each is
    written once, in place into the batch (np.pad then np.stack copied it twice, at 4x the time)."""
    height, width = max(w.shape[0] for w in windows), max(w.shape[1] for w in windows)
    batch = np.empty((len(windows), height, width, 3), np.uint8)
    for out, w in zip(batch, windows):
        cv2.copyMakeBorder(w, 0, height - w.shape[0], 0, width - w.shape[1], cv2.BORDER_REPLICATE, dst=out)
    return torch.from_numpy(batch)


def warp_windows(windows: torch.Tensor, matrices: torch.Tensor, size: int) -> torch.Tensor:
    """Batched :meth:`Augmentation.warp_frame` + :func:`normalize_image` on the tensors' device.

    ``windows [B, h, w, 3]`` uint8 RGB, ``matrices [B, 2, 3]`` (crop pixel -> window pixel) -> ``[B, 3, S, S]``
    float, bilinear with the border replicated. With pixel centres at ``(2 p + 1) / n - 1`` in grid_sample's
    normalised coordinates (align_corners=False), crop pixel ``p = ((u + 1) S - 1) / 2`` maps to window pixel
    ``q = A p + b`` and ``q_n = (2 q + 1) / (w, h) - 1``. Unlike cv2.warpAffine, positions and values are not
    rounded (cv2: 1/32 px, uint8): the two differ by at most about half a grey level (tests/test_pairs.py)."""
    batch, height, width, _ = windows.shape
    images = windows.permute(0, 3, 1, 2).float()
    A, b = matrices[:, :, :2].float(), matrices[:, :, 2].float()
    extent = torch.tensor([width, height], dtype=images.dtype, device=images.device)
    # q_n = (2 (A p + b) + 1) / n - 1 with p = (S u + S - 1) / 2  =>  q_n = (S A u + A (S - 1) 1 + 2 b + 1) / n - 1
    theta = torch.cat([size * A / extent[:, None], ((A.sum(-1) * (size - 1) + 2 * b + 1) / extent - 1)[..., None]], -1)
    grid = F.affine_grid(theta, [batch, 3, size, size], align_corners=False)
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False) / 255
    mean, std = (torch.tensor(v, dtype=images.dtype, device=images.device)[:, None, None] for v in (IMAGE_MEAN, IMAGE_STD))
    return (warped - mean) / std


@dataclass
class Augmentation:
    """Scale, crop and flip applied identically to frame and flow, without resizing either whole.

    The short side is scaled to ``crop_size * max(1, s)``, ``s ~ U(scale_range)`` (per-axis factors as the size
    rounds); flow vectors are multiplied by the same factors, and a horizontal flip mirrors both and negates u.
    Evaluation (``train=False``): ``s = 1``, centre crop, no flip. :meth:`draw` makes the sample's
    :class:`CropTransform`; the frame is warped straight from the stored image to the crop (:meth:`warp_frame`)
    and the flow is read only where it is needed (:func:`flow_at`, :func:`crop_valid`).
    """

    crop_size: int
    scale_range: tuple[float, float] = (1.0, 1.5)
    train: bool = True
    # Shrinking by more than this resizes the whole frame first with INTER_AREA (anti-aliased), as before;
    # at or above it, one bilinear warp differs from INTER_AREA by a few grey levels (tests/test_pairs.py).
    area_below: float = 0.75

    def draw(self, shape: tuple[int, int], rng: np.random.Generator) -> CropTransform:
        """The transform for a stored ``shape (H, W)``; draws s, top, left, flip from ``rng`` in that order."""
        s = max(1.0, rng.uniform(*self.scale_range)) if self.train else 1.0  # never below the crop
        factor = self.crop_size * s / min(shape)
        width, height = max(self.crop_size, round(shape[1] * factor)), max(self.crop_size, round(shape[0] * factor))
        if self.train:
            top, left = rng.integers(0, height - self.crop_size + 1), rng.integers(0, width - self.crop_size + 1)
        else:
            top, left = (height - self.crop_size) // 2, (width - self.crop_size) // 2
        flip = bool(self.train and rng.random() < 0.5)
        return CropTransform(tuple(shape), (width / shape[1], height / shape[0]), int(left), int(top), self.crop_size, flip)

    def shrunk(self, frame: np.ndarray, transform: CropTransform) -> tuple[np.ndarray, CropTransform]:
        """(frame, transform) with a shrink below ``area_below`` done first by INTER_AREA (the transform then scale 1)."""
        if min(transform.scale) >= self.area_below:
            return frame, transform
        height, width = frame.shape[:2]
        frame = cv2.resize(frame, (round(width * transform.scale[0]), round(height * transform.scale[1])), interpolation=cv2.INTER_AREA)
        return frame, CropTransform(frame.shape[:2], (1.0, 1.0), transform.left, transform.top, transform.size, transform.flip)

    def warp_frame(self, frame: np.ndarray, transform: CropTransform) -> np.ndarray:
        """Stored ``frame [H, W, 3]`` uint8 -> the crop ``[S, S, 3]``: one cv2.warpAffine (bilinear, border replicated)."""
        frame, transform = self.shrunk(frame, transform)
        return cv2.warpAffine(frame, transform.matrix(), (transform.size, transform.size),
                              flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)

    def __call__(self, frame: np.ndarray, flow: np.ndarray, valid: np.ndarray, rng: np.random.Generator):
        """Dense form: frame ``[H, W, 3]`` uint8, flow ``[H, W, 2]``, valid ``[H, W]`` -> the same, ``crop_size`` square."""
        transform = self.draw(frame.shape[:2], rng)
        size = self.crop_size
        dense_flow = flow_at(np.where(valid[..., None], flow, 0).astype(np.float32), transform, all_pixels(size))
        return self.warp_frame(frame, transform), dense_flow.reshape(size, size, 2), crop_valid(valid, transform)


_NORMALISE = ((np.arange(256, dtype=np.float32) / 255)[None] - np.float32(IMAGE_MEAN)[:, None]) / np.float32(IMAGE_STD)[:, None]


def normalize_image(frame: np.ndarray) -> torch.Tensor:
    """``[H, W, 3]`` uint8 RGB -> ``[3, H, W]`` float: RGB in [0, 1], then ``(x - IMAGE_MEAN) / IMAGE_STD``
    (a 256-entry table per channel, the same float32 values as computing it)."""
    return torch.from_numpy(np.stack([_NORMALISE[c][frame[..., c]] for c in range(3)]))


def sample_points(valid: np.ndarray, num_points: int, rng: np.random.Generator) -> np.ndarray:
    """``num_points`` pixel centres ``[N, 2]`` (x, y), uniform among valid pixels (without
    replacement when there are enough)."""
    if valid.all():  # the usual case (dense estimated flow): the same draw without listing the pixels
        chosen = rng.choice(valid.size, size=num_points, replace=valid.size < num_points)
        ys, xs = np.divmod(chosen, valid.shape[1])
        return np.stack([xs, ys], axis=-1).astype(np.float32)
    ys, xs = np.nonzero(valid)
    if len(xs) == 0:
        ys, xs = np.nonzero(np.ones_like(valid))
    chosen = rng.choice(len(xs), size=num_points, replace=len(xs) < num_points)
    return np.stack([xs[chosen], ys[chosen]], axis=-1).astype(np.float32)


def scan_members(path: Path) -> dict[str, dict[str, tuple[int, int]]]:
    """``{key: {member suffix: (data offset, size)}}`` for the samples of one tar shard."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile() and "." in member.name:
                key, suffix = member.name.split(".", 1)
                samples.setdefault(key, {})[suffix] = (member.offset_data, member.size)
    return samples


def member_index_path(shard: Path) -> Path:
    """Where a shard's member offsets are cached: ``<shard>.members.json`` beside it."""
    return shard.with_name(shard.name + ".members.json")


def _shard_stamp(shard: Path) -> list[int]:
    stat = shard.stat()
    return [stat.st_size, stat.st_mtime_ns]


def write_member_index(shard: Path) -> dict[str, dict[str, tuple[int, int]]]:
    """Scan ``shard``'s tar headers and cache the offsets beside it, stamped with the shard's size and mtime
    (atomic; not cached where the folder is read-only). Returns ``{key: {suffix: (offset, size)}}``."""
    members = scan_members(shard)
    try:
        write_text_atomic(member_index_path(shard), json.dumps({"shard": _shard_stamp(shard), "members": members}))
    except OSError:
        pass  # a read-only copy of the data: scanned again next time
    return members


def shard_members(shard: Path) -> dict[str, dict[str, tuple[int, int]]]:
    """The member offsets of ``shard``: from its cache when the stamp still matches the shard, else a fresh scan.

    Scanning reads every tar header (about 60 µs a sample when cached by the OS, benchmarks/shard_index.py: some
    90 s for the paper's 1.6M pairs, on every rank of every run); the cache makes startup a JSON read (about 10 s)."""
    try:
        cached = json.loads(member_index_path(shard).read_text())
        if cached["shard"] == _shard_stamp(shard):
            return {key: {suffix: tuple(where) for suffix, where in members.items()} for key, members in cached["members"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no cache, or a stale or damaged one
    return write_member_index(shard)


class PairShards(Dataset):
    """Map-style view of one split's shards; item ``i`` -> one augmented sample, or None when a
    member fails to decode (skipped by the collate function, warned once per shard file). With
    ``warp_on_device`` a sample holds ``window`` and ``matrix`` (:func:`cut_window`) in place of ``image``."""

    def __init__(self, data_dir: str | Path, split: str, augmentation: Augmentation, num_points: int,
                 max_magnitude: float = 56.0, seed: int = 0, warp_on_device: bool = False):
        index = read_index(data_dir)
        if split not in index["splits"] or not index["splits"][split]["shards"]:
            raise InvalidInputError(f"{data_dir} has no '{split}' shards: prepare more videos or a larger --val-fraction")
        self.shards = [Path(data_dir) / shard["path"] for shard in index["splits"][split]["shards"]]
        # Items as flat NumPy arrays, not a list of Python objects: DataLoader workers then share these pages with
        # the parent instead of copying them as reference counts change (a list of 1.6M tuples grows every worker).
        shard_of, keys, spans = [], [], []
        for shard_index, (shard, listed) in enumerate(zip(self.shards, index["splits"][split]["shards"])):
            found = shard_members(shard)
            if len(found) != listed.get("num_samples", len(found)):  # a tar cut between two samples reads as a short one
                raise InvalidInputError(f"{shard} holds {len(found)} of the {listed['num_samples']} samples {data_dir}/index.json "
                                        "lists (cut short?): delete it and its record under records/, then rerun the prepare command")
            for key, members in sorted(found.items()):
                shard_of.append(shard_index)
                keys.append(key)
                spans.append([members.get(name, (-1, 0)) for name in MEMBERS])
        self.shard_of = np.asarray(shard_of, dtype=np.int32)  # [I]
        self.keys = np.asarray(keys, dtype=str)  # [I] fixed-width
        self.spans = np.asarray(spans, dtype=np.int64).reshape(-1, len(MEMBERS), 2)  # [I, member, (offset, size)]; -1: absent
        self.augmentation, self.num_points, self.max_magnitude, self.seed = augmentation, num_points, max_magnitude, seed
        self.warp_on_device = warp_on_device
        self.epoch = 0  # set through set_epoch by the training module at each epoch start
        self.failures: dict[Path, int] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def flow_member_name(self, i: int) -> str:
        """The member item ``i`` holds its flow in (the first of :data:`FLOW_MEMBERS` present; ``flow.png`` when none)."""
        present = np.flatnonzero(self.spans[i, 1:, 0] >= 0)
        return FLOW_MEMBERS[present[0] if len(present) else 0]

    def read_members(self, i: int) -> tuple[bytes, bytes, str]:
        """(frame bytes, flow bytes, flow member name) of item ``i``; KeyError when one is missing."""
        shard, key, flow_name = self.shards[self.shard_of[i]], str(self.keys[i]), self.flow_member_name(i)
        spans = self.spans[i]
        out = []
        with open(shard, "rb") as f:
            for name, (offset, size) in ((MEMBERS[0], spans[0]), (flow_name, spans[1 + FLOW_MEMBERS.index(flow_name)])):
                if offset < 0:
                    raise KeyError(f"no {key}.{name} member")
                f.seek(offset)
                out.append(f.read(size))
        return out[0], out[1], flow_name

    @staticmethod
    def decode_frame(members: tuple[bytes, bytes, str]) -> np.ndarray:
        """The frame member -> ``[H, W, 3]`` uint8 RGB."""
        frame = cv2.imdecode(np.frombuffer(members[0], np.uint8), cv2.IMREAD_COLOR)
        if frame is None:
            raise ValueError("frame.jpg does not decode")
        return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)

    @staticmethod
    def decode_flow(members: tuple[bytes, bytes, str]) -> tuple[np.ndarray | QuantisedFlow, np.ndarray]:
        """The flow member -> (flow ``[H, W, 2]`` float32 px, valid ``[H, W]`` bool), by its format; ``flow.u8.lz4``
        stays quantised (:class:`QuantisedFlow`): :func:`flow_at` dequantises only the N points' taps."""
        return decode_flow_member(members[2], members[1], quantised=True)

    def rng(self, key: str) -> np.random.Generator:
        """Training: a stream per (seed, epoch, key); evaluation: per key only, the same every epoch."""
        epoch = self.epoch if self.augmentation.train else 0
        return np.random.default_rng([self.seed, epoch, zlib.crc32(key.encode())])

    def augment(self, frame: np.ndarray, flow_valid: tuple[np.ndarray, np.ndarray], rng: np.random.Generator):
        """Draw the sample's transform and warp the frame: (``{"image": [3, S, S]}`` normalised, or ``{"window",
        "matrix"}`` to warp on the device, transform, flow, valid, rng)."""
        transform = self.augmentation.draw(frame.shape[:2], rng)
        if self.warp_on_device:
            window, matrix = cut_window(*self.augmentation.shrunk(frame, transform))
            return {"window": window, "matrix": torch.from_numpy(matrix)}, transform, *flow_valid, rng
        return {"image": normalize_image(self.augmentation.warp_frame(frame, transform))}, transform, *flow_valid, rng

    def finish(self, augmented: tuple, key: str) -> dict:
        """N points among the crop's valid pixels and their eq. 6 flow, read from the stored field -> the sample dict."""
        pixels, transform, flow, valid, rng = augmented
        points = sample_points(crop_valid(valid, transform), self.num_points, rng)
        flow_points = flow_at(flow, transform, points)
        return {**pixels, "points": torch.from_numpy(points),
                "flow": torch.from_numpy(normalize_flow(flow_points, self.max_magnitude)), "key": key}

    def _decoded(self, i: int):
        """Item ``i``'s (frame RGB, (flow, valid)), or None when a member fails to decode (warned)."""
        shard, key = self.shards[self.shard_of[i]], str(self.keys[i])
        try:
            members = self.read_members(i)
            frame, (flow, valid) = self.decode_frame(members), self.decode_flow(members)
            if flow.shape[:2] != frame.shape[:2]:
                raise ValueError(f"flow {flow.shape[:2]} and frame {frame.shape[:2]} sizes differ")
        except (KeyError, ValueError, OSError, cv2.error) as error:
            self._warn_once(shard, key, error)
            return None
        return frame, (flow, valid)

    def dense_sample(self, i: int) -> dict | None:
        """Item ``i`` with its whole flow field instead of sampled pixels (None when it fails to decode):
        ``frame [S, S, 3]`` uint8 RGB, ``image [3, S, S]`` normalised, ``flow [S, S, 2]`` pixels, ``valid [S, S]``, ``key``."""
        decoded = self._decoded(i)
        if decoded is None:
            return None
        frame, flow, valid = self.augmentation(decoded[0], *decoded[1], self.rng(str(self.keys[i])))
        return {"frame": frame, "image": normalize_image(frame), "flow": flow, "valid": valid, "key": str(self.keys[i])}

    def __getitem__(self, i: int):
        decoded = self._decoded(i)
        if decoded is None:
            return None
        key = str(self.keys[i])
        return self.finish(self.augment(*decoded, self.rng(key)), key)

    def _warn_once(self, shard: Path, key: str, error: Exception) -> None:
        self.failures[shard] = self.failures.get(shard, 0) + 1
        if self.failures[shard] == 1:
            warnings.warn(f"skipping undecodable sample {key} in {shard}: {error} (further failures in this file are counted silently)")


def collate_skipping_failures(samples: list) -> dict:
    """Batch the samples that decoded, with ``skipped``: how many did not. When none did, the batch is
    ``{"skipped": n}`` alone (the module counts it and skips the step). Windows (``augment_on_device``) are padded
    to the batch's largest (:func:`pad_windows`)."""
    decoded = [s for s in samples if s is not None]
    windows = [s["window"] for s in decoded if "window" in s]  # of different sizes: padded, not stacked
    fixed = [{k: v for k, v in s.items() if k != "window"} for s in decoded]
    batch = {**(default_collate(fixed) if fixed else {}), "skipped": len(samples) - len(decoded)}
    return {**batch, "window": pad_windows(windows)} if windows else batch


class PairDataModule(L.LightningDataModule):
    """Batches of frames, sampled pixels and their normalised flow from prepared shards.

    Args:
        data_dir: output folder of ``crossflow prepare`` (holds index.json).
        crop_size: square training crop (paper: 224).
        batch_size: images per batch per process (paper: 96 in total).
        num_points: pixels sampled per image for the sparse hypercolumns (paper: 512).
        scale_range: short side = crop_size * s, s uniform in this range.
        max_magnitude: M of eq. 6 (paper: 56).
        num_workers: DataLoader worker processes.
        seed: seed of the training order (with the epoch) and of the augmentation (with the epoch and the sample key).
        augment_on_device: workers send the stored pixels under each crop and the batch is warped on the training
            device (:func:`warp_windows`; the same draws, points and flow as on the CPU): for a GPU whose loader
            workers cannot keep up.
    """

    def __init__(self, data_dir: str, crop_size: int = 224, batch_size: int = 96, num_points: int = 512,
                 scale_range: tuple[float, float] = (1.0, 1.5), max_magnitude: float = 56.0,
                 num_workers: int = 4, seed: int = 0, augment_on_device: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.train_set: PairShards | None = None
        self.val_set: PairShards | None = None

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        read_index(h.data_dir)  # fail early, with the message, before any worker starts
        if stage in (None, "fit"):
            self.train_set = PairShards(h.data_dir, "train", Augmentation(h.crop_size, tuple(h.scale_range)), h.num_points,
                                        h.max_magnitude, h.seed, h.augment_on_device)
        if stage in (None, "fit", "validate"):
            self.val_set = PairShards(h.data_dir, "val", Augmentation(h.crop_size, train=False), h.num_points,
                                      h.max_magnitude, h.seed, h.augment_on_device)

    def _loader(self, dataset: PairShards, shuffle: bool) -> DataLoader:
        settings = dict(num_workers=self.hparams.num_workers, collate_fn=collate_skipping_failures,
                        persistent_workers=False, pin_memory=torch.cuda.is_available())
        if shuffle:  # training: a permutation per (seed, epoch) that a checkpoint resumes mid-epoch
            return ResumableLoader(dataset, self.hparams.batch_size, self.hparams.seed, self.trainer, drop_last=True, **settings)
        return DataLoader(dataset, batch_size=self.hparams.batch_size, **settings)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """With ``augment_on_device``: the batch's windows -> ``image``, on the device they were moved to."""
        if "window" not in batch:
            return batch
        image = warp_windows(batch.pop("window"), batch.pop("matrix"), self.hparams.crop_size)
        return {**batch, "image": image}

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

