"""Optical flow: file I/O (KITTI 16-bit PNG, Middlebury .flo), the paper's normalisation, estimators.

Flow arrays are float32 ``[H, W, 2]`` with the last axis ``(u, v)`` in pixels
(u to the right, v down); ``valid`` is a bool ``[H, W]`` mask.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch

FLO_MAGIC = 202021.25
FLO_UNKNOWN = 1e9  # Middlebury: components above this mean "unknown"
KITTI_SCALE = 64.0
KITTI_OFFSET = 2.0**15


def normalize_flow(flow, max_magnitude: float = 56.0):
    """Paper eq. 6, per component: ``f' = sign(f) * min(1, log(|f| + 1) / log(M + 1))``.

    Works on numpy arrays and torch tensors of any shape (last axis ``(u, v)``);
    the result lies in ``[-1, 1]`` and has the input's type.
    """
    if isinstance(flow, torch.Tensor):
        scaled = torch.log1p(flow.abs()) / np.log1p(max_magnitude)
        return torch.sign(flow) * torch.clamp(scaled, max=1.0)
    flow = np.asarray(flow)
    scaled = np.log1p(np.abs(flow)) / np.log1p(max_magnitude)
    return (np.sign(flow) * np.minimum(scaled, 1.0)).astype(flow.dtype, copy=False)


def encode_kitti_png(flow: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Flow ``[H, W, 2]`` -> uint16 ``[H, W, 3]`` in OpenCV's BGR order (B=valid, G=v, R=u).

    KITTI stores ``value = 64 * f + 2^15`` (so 1/64 px resolution, |f| < 512 px);
    values outside that range are clipped.
    """
    flow = np.asarray(flow, dtype=np.float64)
    if valid is None:
        valid = np.isfinite(flow).all(axis=-1)
    encoded = np.clip(np.round(np.nan_to_num(flow) * KITTI_SCALE + KITTI_OFFSET), 0, 2**16 - 1)
    out = np.empty(flow.shape[:2] + (3,), dtype=np.uint16)
    out[..., 2] = encoded[..., 0]
    out[..., 1] = encoded[..., 1]
    out[..., 0] = valid.astype(np.uint16)
    return out


def decode_kitti_png(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint16 BGR image as OpenCV reads it -> (flow ``[H, W, 2]`` float32, valid ``[H, W]``)."""
    if image is None or image.dtype != np.uint16 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError("not a KITTI flow PNG: expected a 3-channel 16-bit image")
    flow = (image[..., [2, 1]].astype(np.float32) - KITTI_OFFSET) / KITTI_SCALE
    valid = image[..., 0] > 0
    return flow, valid


def encode_kitti_png_bytes(flow: np.ndarray, valid: np.ndarray | None = None) -> bytes:
    """The bytes of a KITTI flow PNG (what a shard stores as ``flow.png``)."""
    ok, buffer = cv2.imencode(".png", encode_kitti_png(flow, valid))
    if not ok:
        raise ValueError("could not encode flow as PNG")
    return buffer.tobytes()


def decode_kitti_png_bytes(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`encode_kitti_png_bytes`."""
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    return decode_kitti_png(image)


# Shard flow formats. KITTI's PNG costs 1.8-4 ms a decode (zlib and PNG filters over 6 bytes a pixel); the other two
# are own byte layouts around a standard compressor, made to decode at the loader's rate (benchmarks/flow_formats.py).
#   flow.png       KITTI 16-bit PNG, 1/64 px (as read_flow/write_flow).
#   flow.i16.zst   the same 1/64 px values as int16 planes (u, v), each row minus the row above, zstd: lossless
#                  with respect to flow.png.
#   flow.u8.lz4    per image and component, g = sign(f) log(1 + |f|) (eq. 6 before its 1/log(M + 1)) quantised
#                  to 256 levels between its min and max, LZ4: lossy, decoded with a 256-entry table.
# Both own layouts: magic, uint32 height, width, uint8 all-valid; flow.u8.lz4 then float32 (lo_u, hi_u, lo_v, hi_v);
# then the planes, then (unless all valid) the valid mask as np.packbits.
FLOW_FORMATS = {"kitti-png": "flow.png", "i16-zstd": "flow.i16.zst", "u8-lz4": "flow.u8.lz4"}
FLOW_MEMBERS = tuple(FLOW_FORMATS.values())  # shard member names, in the order a sample's flow is looked for
_I16_MAGIC, _U8_MAGIC = b"CFI1", b"CFU1"
_HEADER = struct.Struct("<4sIIB")
_U8_RANGES = struct.Struct("<4f")


def encode_flow_member(flow: np.ndarray, valid: np.ndarray | None, flow_format: str) -> tuple[str, bytes]:
    """Flow ``[H, W, 2]`` px (and valid ``[H, W]``; default: finite) -> (member name, bytes) in ``flow_format``
    (a key of :data:`FLOW_FORMATS`)."""
    if flow_format not in FLOW_FORMATS:
        raise ValueError(f"unknown flow format {flow_format!r}; choose one of {', '.join(FLOW_FORMATS)}")
    flow = np.asarray(flow, dtype=np.float32)
    valid = (np.isfinite(flow[..., 0]) & np.isfinite(flow[..., 1])) if valid is None else np.asarray(valid, bool)
    if flow_format == "kitti-png":
        return FLOW_FORMATS[flow_format], encode_kitti_png_bytes(flow, valid)
    import lz4.frame
    import zstandard

    height, width = flow.shape[:2]
    # [2, H, W], contiguous: reductions over a transposed view run about 200x slower (2 ms a plane at 256 x 341)
    flow = np.ascontiguousarray(np.where(valid[..., None], np.nan_to_num(flow), 0).transpose(2, 0, 1))
    mask = b"" if valid.all() else np.packbits(valid).tobytes()
    header = (_I16_MAGIC if flow_format == "i16-zstd" else _U8_MAGIC, height, width, int(not mask))
    if flow_format == "i16-zstd":
        values = np.clip(np.round(flow * KITTI_SCALE), -(2**15), 2**15 - 1).astype(np.int16)  # flow.png's values - 2^15
        deltas = values.copy()
        deltas[:, 1:] -= values[:, :-1]  # wraps in int16, as the decoder's cumulative sum does
        return FLOW_FORMATS[flow_format], zstandard.ZstdCompressor(level=3).compress(_HEADER.pack(*header) + deltas.tobytes() + mask)
    logs = np.sign(flow) * np.log1p(np.abs(flow))
    lo = logs.min(axis=(1, 2), where=valid, initial=np.inf) if mask else logs.min(axis=(1, 2))
    hi = logs.max(axis=(1, 2), where=valid, initial=-np.inf) if mask else logs.max(axis=(1, 2))
    lo, hi = np.where(np.isfinite(lo), lo, 0), np.where(np.isfinite(hi), hi, 0)
    step = np.maximum(hi - lo, 1e-12)[:, None, None] / 255
    levels = np.clip(np.round((logs - lo[:, None, None]) / step), 0, 255).astype(np.uint8)
    ranges = _U8_RANGES.pack(lo[0], hi[0], lo[1], hi[1])
    return FLOW_FORMATS[flow_format], lz4.frame.compress(_HEADER.pack(*header) + ranges + levels.tobytes() + mask)


def u8_error_bound(data: bytes, max_magnitude: float = 56.0, max_vector_scale: float = 1.5) -> float:
    """The largest error a ``flow.u8.lz4`` member can put into eq. 6 normalised flow (the loss's units):
    half a level ``(hi - lo) / 510`` in ``g``, times ``max(1, a) / log(M + 1)`` for augmentation scaling the
    vectors by ``a <= max_vector_scale`` (``d log(1 + a|f|) <= max(1, a) d log(1 + |f|)``)."""
    import lz4.frame

    raw = lz4.frame.decompress(data)
    lo_u, hi_u, lo_v, hi_v = _U8_RANGES.unpack_from(raw, _HEADER.size)
    return max(hi_u - lo_u, hi_v - lo_v) / 510 * max(1.0, max_vector_scale) / np.log1p(max_magnitude)


@dataclass(frozen=True)
class QuantisedFlow:
    """A ``flow.u8.lz4`` field left as its levels, dequantised only where it is read.

    ``levels [2, H, W]`` uint8 and ``tables [2, 256]`` float32 (level -> pixels, per component). It indexes like the
    decoded ``[H, W, 2]`` field at integer arrays: ``flow[ys, xs]`` -> ``[N, 2]``, ``tables[c][levels[c, ys, xs]]``,
    the very float32 values of the dense field there; ``np.asarray(flow)`` is the dense field."""

    levels: np.ndarray
    tables: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return (*self.levels.shape[1:], 2)

    def __getitem__(self, index: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        flat = index[0] * self.levels.shape[2] + index[1]  # np.take of a flat index: 2x faster than a 2-d gather
        return np.array([table.take(level.take(flat)) for table, level in zip(self.tables, self.levels.reshape(2, -1))]).T

    def dense(self) -> np.ndarray:
        """``[H, W, 2]`` float32, a view of planes ``[2, H, W]``."""
        planes = np.empty(self.levels.shape, np.float32)
        for c in range(2):
            cv2.LUT(self.levels[c], self.tables[c], dst=planes[c])  # 4x faster than numpy's take_along_axis
        return planes.transpose(1, 2, 0)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self.dense() if dtype is None else self.dense().astype(dtype)


def u8_tables(lo_hi: tuple[float, float, float, float]) -> np.ndarray:
    """``[2, 256]`` float32 pixels of each level of ``flow.u8.lz4`` with ranges ``(lo_u, hi_u, lo_v, hi_v)``:
    ``g = lo + k (hi - lo) / 255``, ``f = sign(g) (exp(|g|) - 1)``."""
    lo_u, hi_u, lo_v, hi_v = lo_hi
    logs = np.array([lo_u, lo_v])[:, None] + np.arange(256) * (np.array([hi_u - lo_u, hi_v - lo_v]) / 255)[:, None]
    return (np.sign(logs) * np.expm1(np.abs(logs))).astype(np.float32)


def decode_flow_member(name: str, data: bytes, quantised: bool = False) -> tuple[np.ndarray | QuantisedFlow, np.ndarray]:
    """A shard's flow member ``name`` (one of :data:`FLOW_MEMBERS`) -> (flow ``[H, W, 2]`` float32, valid ``[H, W]``);
    the flow of the own formats is a view of planes ``[2, H, W]`` (index it, or np.ascontiguousarray it). With
    ``quantised``, a ``flow.u8.lz4`` flow comes as :class:`QuantisedFlow` (for a loader reading a few pixels)."""
    if name == "flow.png":
        return decode_kitti_png_bytes(data)
    if name not in FLOW_MEMBERS:
        raise ValueError(f"unknown flow member {name!r}; known: {', '.join(FLOW_MEMBERS)}")
    import lz4.frame
    import zstandard

    try:
        raw = zstandard.ZstdDecompressor().decompress(data) if name == "flow.i16.zst" else lz4.frame.decompress(data)
    except (zstandard.ZstdError, RuntimeError) as error:
        raise ValueError(f"{name} does not decompress: {error}") from None
    magic, height, width, all_valid = _HEADER.unpack_from(raw)
    start = _HEADER.size + (_U8_RANGES.size if name == "flow.u8.lz4" else 0)
    plane_bytes = 2 * height * width * (2 if name == "flow.i16.zst" else 1)
    mask_bytes = 0 if all_valid else (height * width + 7) // 8
    if magic != (_I16_MAGIC if name == "flow.i16.zst" else _U8_MAGIC) or len(raw) != start + plane_bytes + mask_bytes:
        raise ValueError(f"{name} is damaged (bad header or size)")
    if name == "flow.i16.zst":
        deltas = np.frombuffer(raw, np.int16, 2 * height * width, start).reshape(2, height, width)
        planes = np.cumsum(deltas, axis=1, dtype=np.int16) * np.float32(1 / KITTI_SCALE)
        flow = planes.transpose(1, 2, 0)  # [H, W, 2] as a view of the planes (not C-contiguous)
    else:
        levels = np.frombuffer(raw, np.uint8, 2 * height * width, start).reshape(2, height, width)
        flow = QuantisedFlow(levels, u8_tables(_U8_RANGES.unpack_from(raw, _HEADER.size)))
        flow = flow if quantised else flow.dense()
    if all_valid:
        return flow, np.ones((height, width), bool)
    valid = np.unpackbits(np.frombuffer(raw, np.uint8, mask_bytes, start + plane_bytes), count=height * width).reshape(height, width)
    return flow, valid.astype(bool)


def read_flo(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Middlebury ``.flo``: magic 202021.25, int32 width, height, float32 (u, v) interleaved."""
    with open(path, "rb") as f:
        magic = np.fromfile(f, np.float32, count=1)
        if magic.size != 1 or magic[0] != np.float32(FLO_MAGIC):
            raise ValueError(f"{path}: not a Middlebury .flo file (bad magic number)")
        width, height = np.fromfile(f, np.int32, count=2)
        data = np.fromfile(f, np.float32, count=2 * int(width) * int(height))
    if data.size != 2 * width * height:
        raise ValueError(f"{path}: truncated .flo file")
    flow = data.reshape(height, width, 2)
    valid = (np.abs(flow) < FLO_UNKNOWN).all(axis=-1) & np.isfinite(flow).all(axis=-1)
    return np.where(valid[..., None], flow, 0.0).astype(np.float32), valid


def write_flo(path: str | os.PathLike, flow: np.ndarray, valid: np.ndarray | None = None) -> None:
    """Middlebury ``.flo``; invalid pixels are written as the 'unknown' value."""
    flow = np.asarray(flow, dtype=np.float32).copy()
    if valid is not None:
        flow[~valid] = 2 * FLO_UNKNOWN
    height, width = flow.shape[:2]
    with open(path, "wb") as f:
        np.array([FLO_MAGIC], np.float32).tofile(f)
        np.array([width, height], np.int32).tofile(f)
        flow.tofile(f)


def read_flow(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a flow file by extension: ``.png`` (KITTI 16-bit) or ``.flo`` (Middlebury).

    Returns ``(flow [H, W, 2] float32, valid [H, W] bool)``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"flow file not found: {path}")
    if path.suffix.lower() == ".flo":
        return read_flo(path)
    if path.suffix.lower() == ".png":
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        try:
            return decode_kitti_png(image)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
    raise ValueError(f"{path}: unknown flow format (use .png for KITTI 16-bit or .flo)")


def write_flow(path: str | os.PathLike, flow: np.ndarray, valid: np.ndarray | None = None) -> None:
    """Write a flow file by extension (``.png`` KITTI 16-bit, ``.flo`` Middlebury), atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".png", ".flo"):
        raise ValueError(f"{path}: unknown flow format (use .png for KITTI 16-bit or .flo)")
    partial = path.with_name(path.name + ".partial" + suffix)
    if suffix == ".flo":
        write_flo(partial, flow, valid)
    elif not cv2.imwrite(str(partial), encode_kitti_png(flow, valid)):
        raise OSError(f"could not write {path}")
    os.replace(partial, path)


# Estimators

FLOW_METHODS = ("dis", "farneback", "tvl1", "deepflow", "raft")
DIS_PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}
RAFT_MODELS = ("large", "small")
_ESTIMATORS: dict[tuple, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {}


def resolve_flow_params(method: str, **params) -> dict:
    """The full parameters of ``method`` (documented defaults filled in); raises on bad ones.

    - ``dis``: ``preset`` in ultrafast/fast/medium, default ``medium`` (mean EPE 0.22 px on
      Middlebury RubberWhale at about 20 ms per 584x388 pair on one core).
    - ``farneback``: keywords of ``cv2.FarnebackOpticalFlow_create`` (OpenCV defaults).
    - ``tvl1``: keywords of ``cv2.optflow.DualTVL1OpticalFlow_create`` (OpenCV defaults).
    - ``deepflow``: no parameters.
    - ``raft``: ``weights`` (path to a torchvision RAFT state dict, required),
      ``model`` large/small (default large), ``num_flow_updates`` (12), ``device``
      (default ``cuda`` when available, else ``cpu``).
    """
    if method not in FLOW_METHODS:
        raise ValueError(f"unknown flow method {method!r}; choose one of {', '.join(FLOW_METHODS)}")
    if method == "dis":
        params = {"preset": "medium", **params}
        if set(params) != {"preset"} or params["preset"] not in DIS_PRESETS:
            raise ValueError(f"dis takes only preset=one of {', '.join(DIS_PRESETS)}; got {params}")
    elif method == "deepflow" and params:
        raise ValueError(f"deepflow takes no parameters; got {params}")
    elif method == "raft":
        params = {"model": "large", "num_flow_updates": 12, **params}
        _check_raft_params(params)
    return params


def _check_raft_params(params: dict) -> None:
    weights = params.get("weights")
    if not weights:
        raise ValueError(
            "raft needs weights=PATH to a torchvision RAFT state dict (e.g. raft_large_C_T_SKHT_V2-ff5fadd5.pth "
            "from download.pytorch.org/models); nothing is downloaded automatically"
        )
    if not Path(weights).is_file():
        raise FileNotFoundError(f"raft weights file not found: {weights}")
    if params["model"] not in RAFT_MODELS:
        raise ValueError(f"raft model must be one of {', '.join(RAFT_MODELS)}; got {params['model']!r}")
    unknown = set(params) - {"weights", "model", "num_flow_updates", "device"}
    if unknown:
        raise ValueError(f"raft takes weights, model, num_flow_updates, device; unknown: {sorted(unknown)}")


def estimate_flow(frame0: np.ndarray, frame1: np.ndarray, method: str = "dis", **params) -> np.ndarray:
    """Dense flow from ``frame0`` to ``frame1`` -> float32 ``[H, W, 2]`` (u, v) in pixels.

    Frames are uint8 ``[H, W, 3]`` RGB or ``[H, W]`` gray, of equal shape. ``method`` is one of
    :data:`FLOW_METHODS`; ``params`` are described in :func:`resolve_flow_params`. Estimators are
    built once per (method, params, frame size) per process and reused.
    """
    frame0, frame1 = np.asarray(frame0), np.asarray(frame1)
    if frame0.shape != frame1.shape or frame0.dtype != np.uint8 or frame0.ndim not in (2, 3):
        raise ValueError(
            f"frames must be uint8 [H, W] or [H, W, 3] of equal shape; got {frame0.shape} {frame0.dtype} "
            f"and {frame1.shape} {frame1.dtype}"
        )
    params = resolve_flow_params(method, **params)
    # OpenCV's DIS and TV-L1 keep settings adapted to the first (small) image they see, so a
    # shared instance would make results depend on call order: keep one per frame size.
    key = (method, tuple(sorted(params.items())), None if method == "raft" else frame0.shape[:2])
    if key not in _ESTIMATORS:
        _ESTIMATORS[key] = _build_estimator(method, params)
    return np.ascontiguousarray(_ESTIMATORS[key](frame0, frame1), dtype=np.float32)


def _build_estimator(method: str, params: dict) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    if method == "raft":
        return _RaftEstimator(**params)
    if method in ("tvl1", "deepflow") and not hasattr(cv2, "optflow"):
        raise RuntimeError(f"{method} needs OpenCV's contrib modules: pip install opencv-contrib-python-headless")
    try:
        if method == "dis":
            estimator = cv2.DISOpticalFlow_create(DIS_PRESETS[params["preset"]])
        elif method == "farneback":
            estimator = cv2.FarnebackOpticalFlow_create(**params)
        elif method == "tvl1":
            estimator = cv2.optflow.DualTVL1OpticalFlow_create(**params)
        else:
            estimator = cv2.optflow.createOptFlow_DeepFlow()
    except (TypeError, cv2.error) as error:
        raise ValueError(f"bad {method} parameters {params}: {error}") from None
    return lambda frame0, frame1: estimator.calc(_gray(frame0), _gray(frame1), None)


def _gray(frame: np.ndarray) -> np.ndarray:
    return frame if frame.ndim == 2 else cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)


class _RaftEstimator:
    """torchvision RAFT on RGB uint8 frames; pads (replicating edges) to a multiple of 8 of at
    least 128 per side, as RAFT's correlation pyramid needs, and crops the flow back."""

    def __init__(self, weights: str, model: str, num_flow_updates: int, device: str | None = None):
        from torchvision.models.optical_flow import raft_large, raft_small

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.num_flow_updates = int(num_flow_updates)
        self.network = (raft_large if model == "large" else raft_small)(weights=None)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        try:
            self.network.load_state_dict(state)
        except RuntimeError:
            other = "small" if model == "large" else "large"
            raise ValueError(f"{weights} does not hold raft_{model} weights; check the file or try model={other}") from None
        self.network.to(self.device).eval()

    @torch.inference_mode()
    def __call__(self, frame0: np.ndarray, frame1: np.ndarray) -> np.ndarray:
        height, width = frame0.shape[:2]
        batch = torch.stack([self._tensor(frame0), self._tensor(frame1)]).to(self.device)
        pad = (0, max(128, width + -width % 8) - width, 0, max(128, height + -height % 8) - height)
        batch = torch.nn.functional.pad(batch, pad, mode="replicate")
        flow = self.network(batch[:1], batch[1:], num_flow_updates=self.num_flow_updates)[-1]
        return flow[0, :, :height, :width].permute(1, 2, 0).float().cpu().numpy()

    @staticmethod
    def _tensor(frame: np.ndarray) -> torch.Tensor:
        rgb = np.repeat(frame[..., None], 3, axis=2) if frame.ndim == 2 else frame
        return torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1.0
