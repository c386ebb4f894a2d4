"""Shards of (frame, flow) pairs -> augmented training batches: the pretraining DataModule.

Reads the layout `crossflow prepare` writes (``DIR/index.json`` and WebDataset tars whose
samples hold ``<key>.frame.jpg``, ``<key>.flow.png`` (KITTI 16-bit), ``<key>.meta.json``).
The tars are read by random access through an index of member offsets rather than as
a stream: that gives exact epochs under DDP (Lightning's DistributedSampler), validation
seen exactly once, and augmentation that is a pure function of (seed, epoch, sample) so a
run is reproducible. The offsets come from ``<shard>.members.json`` (written by prepare, or
at the first read; rebuilt when the shard's size or mtime changed). A batch is a dict:

    image  [B, 3, S, S]  float, normalised with IMAGE_MEAN / IMAGE_STD
    points [B, N, 2]     float (x, y) pixel centres of the crop, drawn per image among valid flow
    flow   [B, N, 2]     float, eq. 6 normalised flow at those pixels
    key    list of B sample keys
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
from torch.utils.data import DataLoader, Dataset, default_collate

from crossflow.errors import InvalidInputError, MissingInputError
from crossflow.files import write_text_atomic
from crossflow.flow import decode_kitti_png_bytes, normalize_flow
from crossflow.models.backbone import IMAGE_MEAN, IMAGE_STD

PAIRS_FORMAT = "crossflow-pairs"
MEMBERS = ("frame.jpg", "flow.png")


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


@dataclass
class Augmentation:
    """Scale, crop and flip applied identically to frame and flow.

    The frame is resized so its short side is ``crop_size * max(1, s)``, ``s ~ U(scale_range)``;
    flow vectors are multiplied by the same factors (per axis, as the resize rounds). A horizontal flip mirrors both and
    negates u. Evaluation (``train=False``): ``s = 1``, centre crop, no flip.
    """

    crop_size: int
    scale_range: tuple[float, float] = (1.0, 1.5)
    train: bool = True

    def __call__(self, frame: np.ndarray, flow: np.ndarray, valid: np.ndarray, rng: np.random.Generator):
        """frame ``[H, W, 3]`` uint8, flow ``[H, W, 2]``, valid ``[H, W]`` -> the same, ``crop_size`` square."""
        s = max(1.0, rng.uniform(*self.scale_range)) if self.train else 1.0  # never below the crop
        factor = self.crop_size * s / min(frame.shape[:2])
        size = (max(self.crop_size, round(frame.shape[1] * factor)), max(self.crop_size, round(frame.shape[0] * factor)))
        scale = np.array([size[0] / frame.shape[1], size[1] / frame.shape[0]], dtype=np.float32)
        frame = cv2.resize(frame, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
        flow = cv2.resize(np.where(valid[..., None], flow, 0), size, interpolation=cv2.INTER_LINEAR) * scale
        valid = cv2.resize(valid.astype(np.float32), size, interpolation=cv2.INTER_LINEAR) > 0.999
        height, width = frame.shape[:2]
        if self.train:
            top, left = rng.integers(0, height - self.crop_size + 1), rng.integers(0, width - self.crop_size + 1)
        else:
            top, left = (height - self.crop_size) // 2, (width - self.crop_size) // 2
        window = (slice(top, top + self.crop_size), slice(left, left + self.crop_size))
        frame, flow, valid = frame[window], flow[window], valid[window]
        if self.train and rng.random() < 0.5:
            frame, flow, valid = frame[:, ::-1], flow[:, ::-1] * np.array([-1, 1], np.float32), valid[:, ::-1]
        return np.ascontiguousarray(frame), np.ascontiguousarray(flow), np.ascontiguousarray(valid)


def normalize_image(frame: np.ndarray) -> torch.Tensor:
    """``[H, W, 3]`` uint8 RGB -> ``[3, H, W]`` float: RGB in [0, 1], then ``(x - IMAGE_MEAN) / IMAGE_STD``."""
    image = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).float() / 255
    return (image - torch.tensor(IMAGE_MEAN).view(3, 1, 1)) / torch.tensor(IMAGE_STD).view(3, 1, 1)


def sample_points(valid: np.ndarray, num_points: int, rng: np.random.Generator) -> np.ndarray:
    """``num_points`` pixel centres ``[N, 2]`` (x, y), uniform among valid pixels (without
    replacement when there are enough)."""
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
    member fails to decode (skipped by the collate function, warned once per shard file)."""

    def __init__(self, data_dir: str | Path, split: str, augmentation: Augmentation, num_points: int,
                 max_magnitude: float = 56.0, seed: int = 0):
        index = read_index(data_dir)
        if split not in index["splits"] or not index["splits"][split]["shards"]:
            raise InvalidInputError(f"{data_dir} has no '{split}' shards: prepare more videos or a larger --val-fraction")
        self.shards = [Path(data_dir) / shard["path"] for shard in index["splits"][split]["shards"]]
        # Items as flat NumPy arrays, not a list of Python objects: DataLoader workers then share these pages with
        # the parent instead of copying them as reference counts change (a list of 1.6M tuples grows every worker).
        shard_of, keys, spans = [], [], []
        for shard_index, shard in enumerate(self.shards):
            for key, members in sorted(shard_members(shard).items()):
                shard_of.append(shard_index)
                keys.append(key)
                spans.append([members.get(name, (-1, 0)) for name in MEMBERS])
        self.shard_of = np.asarray(shard_of, dtype=np.int32)  # [I]
        self.keys = np.asarray(keys, dtype=str)  # [I] fixed-width
        self.spans = np.asarray(spans, dtype=np.int64).reshape(-1, len(MEMBERS), 2)  # [I, member, (offset, size)]; -1: absent
        self.augmentation, self.num_points, self.max_magnitude, self.seed = augmentation, num_points, max_magnitude, seed
        self.epoch = 0  # set through set_epoch by the training module at each epoch start
        self.failures: dict[Path, int] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _read(self, shard: Path, key: str, name: str, span: np.ndarray) -> bytes:
        offset, size = span.tolist()
        if offset < 0:
            raise KeyError(f"no {key}.{name} member")
        with open(shard, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def _rng(self, key: str) -> np.random.Generator:
        """Training: a stream per (seed, epoch, key); evaluation: per key only, the same every epoch."""
        epoch = self.epoch if self.augmentation.train else 0
        return np.random.default_rng([self.seed, epoch, zlib.crc32(key.encode())])

    def _augmented(self, i: int):
        """Sample ``i`` decoded and augmented: (frame ``[S, S, 3]`` uint8 RGB, flow ``[S, S, 2]`` px, valid ``[S, S]``,
        its rng), or None when a member fails to decode (warned)."""
        shard, key = self.shards[self.shard_of[i]], str(self.keys[i])
        try:
            frame_bytes, flow_bytes = (self._read(shard, key, name, span) for name, span in zip(MEMBERS, self.spans[i]))
            frame = cv2.imdecode(np.frombuffer(frame_bytes, np.uint8), cv2.IMREAD_COLOR)
            if frame is None:
                raise ValueError("frame.jpg does not decode")
            flow, valid = decode_kitti_png_bytes(flow_bytes)
            if flow.shape[:2] != frame.shape[:2]:
                raise ValueError(f"flow {flow.shape[:2]} and frame {frame.shape[:2]} sizes differ")
        except (KeyError, ValueError, OSError, cv2.error) as error:
            self._warn_once(shard, key, error)
            return None
        rng = self._rng(key)
        return (*self.augmentation(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), flow, valid, rng), rng)

    def dense_sample(self, i: int) -> dict | None:
        """Item ``i`` with its whole flow field instead of sampled pixels (None when it fails to decode):
        ``frame [S, S, 3]`` uint8 RGB, ``image [3, S, S]`` normalised, ``flow [S, S, 2]`` pixels, ``valid [S, S]``, ``key``."""
        augmented = self._augmented(i)
        if augmented is None:
            return None
        frame, flow, valid, _ = augmented
        return {"frame": frame, "image": normalize_image(frame), "flow": flow, "valid": valid, "key": str(self.keys[i])}

    def __getitem__(self, i: int):
        augmented = self._augmented(i)
        if augmented is None:
            return None
        frame, flow, valid, rng = augmented
        points = sample_points(valid, self.num_points, rng)
        xs, ys = points[:, 0].astype(int), points[:, 1].astype(int)
        return {
            "image": normalize_image(frame),
            "points": torch.from_numpy(points),
            "flow": torch.from_numpy(normalize_flow(flow[ys, xs], self.max_magnitude)),
            "key": str(self.keys[i]),
        }

    def _warn_once(self, shard: Path, key: str, error: Exception) -> None:
        self.failures[shard] = self.failures.get(shard, 0) + 1
        if self.failures[shard] == 1:
            warnings.warn(f"skipping undecodable sample {key} in {shard}: {error} (further failures in this file are counted silently)")


def collate_skipping_failures(samples: list) -> dict:
    """Batch the samples that decoded, with ``skipped``: how many did not. When none did, the batch is
    ``{"skipped": n}`` alone (the module counts it and skips the step)."""
    decoded = [s for s in samples if s is not None]
    return {**(default_collate(decoded) if decoded else {}), "skipped": len(samples) - len(decoded)}


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
        seed: augmentation seed (with the epoch and the sample key).
    """

    def __init__(self, data_dir: str, crop_size: int = 224, batch_size: int = 96, num_points: int = 512,
                 scale_range: tuple[float, float] = (1.0, 1.5), max_magnitude: float = 56.0,
                 num_workers: int = 4, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.train_set: PairShards | None = None
        self.val_set: PairShards | None = None

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        read_index(h.data_dir)  # fail early, with the message, before any worker starts
        if stage in (None, "fit"):
            self.train_set = PairShards(h.data_dir, "train", Augmentation(h.crop_size, tuple(h.scale_range)), h.num_points, h.max_magnitude, h.seed)
        if stage in (None, "fit", "validate"):
            self.val_set = PairShards(h.data_dir, "val", Augmentation(h.crop_size, train=False), h.num_points, h.max_magnitude, h.seed)

    def _loader(self, dataset: PairShards, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.hparams.batch_size, shuffle=shuffle, drop_last=shuffle,
                          num_workers=self.hparams.num_workers, collate_fn=collate_skipping_failures,
                          persistent_workers=False, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

