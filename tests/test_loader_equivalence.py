"""The loader's fast paths give the very samples of their definitions, bit for bit, on shards the real
`crossflow prepare` made from real clips: the flow at the N points read from the quantised levels
(:class:`QuantisedFlow`, only the taps dequantised) against the whole field dequantised then read bilinearly,
and the batch's windows padded in place against np.pad then np.stack."""

import struct
from pathlib import Path

import cv2
import lz4.frame
import numpy as np
import pytest
import torch

from crossflow.cli import main as crossflow
from crossflow.data.pairs import (
    Augmentation,
    CropTransform,
    PairShards,
    collate_skipping_failures,
    crop_valid,
    flow_at,
    normalize_image,
    sample_points,
)
from crossflow.flow import QuantisedFlow, decode_flow_member, encode_flow_member, normalize_flow

from .conftest import SHARED_DATA

VIDEOS = SHARED_DATA / "video"
CLIPS = ("realshort.mp4", "carphone_pristine.mp4", "bikes.mp4")
CONFIGS = [(112, 256), (64, 128)]  # (crop, N) on a 128 px short side: one warp, and INTER_AREA shrinking first
pytestmark = pytest.mark.skipif(not VIDEOS.is_dir(), reason=f"real video clips not found at {VIDEOS}")


@pytest.fixture(scope="module")
def real_pairs(tmp_path_factory) -> Path:
    """Three real clips through the real `crossflow prepare` (flow.u8.lz4, its default format)."""
    videos = tmp_path_factory.mktemp("clips")
    for name in CLIPS:
        (videos / name).symlink_to(VIDEOS / name)
    out = tmp_path_factory.mktemp("real-pairs")
    assert crossflow(["prepare", str(videos), "--out", str(out), "--frames-per-video", "4", "--short-side", "128", "--gap", "3",
                      "--val-fraction", "0.3", "--workers", "1", "--seed", "0", "--method", "dis:preset=fast"]) == 0
    return out


def identical(a, b) -> bool:
    """Same dtype, shape and bytes (so -0.0 and 0.0 differ, as they would in a batch)."""
    a, b = (x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x) for x in (a, b))
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def dequantised_reference(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """A ``flow.u8.lz4`` member decoded from its layout, every pixel: header ``<4sIIB`` (magic, H, W, all valid),
    ``<4f`` (lo_u, hi_u, lo_v, hi_v), u8 planes [2, H, W], packed mask; level k of a component ->
    ``g = lo + k (hi - lo) / 255`` in float64, ``f = sign(g) (exp(|g|) - 1)`` rounded to float32."""
    raw = lz4.frame.decompress(data)
    magic, height, width, all_valid = struct.unpack_from("<4sIIB", raw)
    ranges = np.array(struct.unpack_from("<4f", raw, 13)).reshape(2, 2)  # [(lo, hi) of u, of v]
    levels = np.frombuffer(raw, np.uint8, 2 * height * width, 29).reshape(2, height, width)
    logs = ranges[:, :1] + np.arange(256) * ((ranges[:, 1:] - ranges[:, :1]) / 255)
    tables = (np.sign(logs) * np.expm1(np.abs(logs))).astype(np.float32)
    field = np.stack([tables[0][levels[0]], tables[1][levels[1]]], axis=-1)
    packed = np.frombuffer(raw, np.uint8, offset=29 + 2 * height * width)
    valid = np.ones((height, width), bool) if all_valid else np.unpackbits(packed, count=height * width).reshape(height, width) > 0
    return field, valid


def bilinear_reference(field: np.ndarray, transform: CropTransform, points: np.ndarray) -> np.ndarray:
    """The definition of the flow at crop pixels ``points [N, 2]``: stored position (clamped to the border), floor,
    float32 weights, four reads of the dense ``field [H, W, 2]`` (a tap of weight 0 reads the pixel itself), then
    ``(1 - wy) ((1 - wx) f00 + wx f01) + wy ((1 - wx) f10 + wx f11)`` scaled by the vector scale."""
    height, width = field.shape[:2]
    x = np.clip(transform.source_x(points[:, 0].astype(np.float64)), 0, width - 1)
    y = np.clip(transform.source_y(points[:, 1].astype(np.float64)), 0, height - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    wx, wy = (x - x0).astype(np.float32), (y - y0).astype(np.float32)
    x1, y1 = np.minimum(x0 + (wx > 0), width - 1), np.minimum(y0 + (wy > 0), height - 1)
    wx, wy = wx[:, None], wy[:, None]
    top = field[y0, x0] * (1 - wx) + field[y0, x1] * wx
    bottom = field[y1, x0] * (1 - wx) + field[y1, x1] * wx
    return (top * (1 - wy) + bottom * wy) * transform.vector_scale()


def window_reference(frame: np.ndarray, transform: CropTransform) -> tuple[np.ndarray, np.ndarray]:
    """The stored pixels under every crop pixel's taps (rows and columns floor-clamped, plus the next one), and the
    crop -> window affine map."""
    crop = np.arange(transform.size, dtype=np.float64)
    cols = np.clip(np.floor(transform.source_x(crop)), 0, frame.shape[1] - 1).astype(int)
    rows = np.clip(np.floor(transform.source_y(crop)), 0, frame.shape[0] - 1).astype(int)
    matrix = transform.matrix() - np.array([[0, 0, cols.min()], [0, 0, rows.min()]])
    return frame[rows.min():rows.max() + 2, cols.min():cols.max() + 2], matrix.astype(np.float32)


def reference_sample(dataset: PairShards, i: int) -> dict:
    """Item ``i`` from the definitions: the JPEG decoded by OpenCV, the whole flow field dequantised (every pixel),
    the sample's draws, N points among the crop's valid pixels and the flow read bilinearly there, eq. 6."""
    frame_bytes, flow_bytes, name = dataset.read_members(i)
    frame = cv2.cvtColor(cv2.imdecode(np.frombuffer(frame_bytes, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    field, valid = dequantised_reference(flow_bytes)
    key = str(dataset.keys[i])
    rng, augmentation = dataset.rng(key), dataset.augmentation
    transform = augmentation.draw(frame.shape[:2], rng)
    if dataset.warp_on_device:
        window, matrix = window_reference(*augmentation.shrunk(frame, transform))
        pixels = {"window": window, "matrix": torch.from_numpy(matrix)}
    else:
        pixels = {"image": normalize_image(augmentation.warp_frame(frame, transform))}
    points = sample_points(crop_valid(valid, transform), dataset.num_points, rng)
    flow = normalize_flow(bilinear_reference(field, transform, points), dataset.max_magnitude)
    return {**pixels, "points": torch.from_numpy(points), "flow": torch.from_numpy(flow), "key": key, "transform": transform}


@pytest.mark.parametrize("crop, num_points", CONFIGS)
@pytest.mark.parametrize("on_device", [False, True], ids=["cpu", "on-device"])
def test_every_sample_and_batch_is_its_definition_bit_for_bit(real_pairs, crop, num_points, on_device):
    flips, window_sizes = set(), set()
    for split, augmentation, epochs in (("train", Augmentation(crop, (1.0, 1.5)), (0, 1)), ("val", Augmentation(crop, train=False), (0,))):
        dataset = PairShards(real_pairs, split, augmentation, num_points, seed=5, warp_on_device=on_device)
        assert len(dataset) >= 3 and dataset.flow_member_name(0) == "flow.u8.lz4"
        assert isinstance(dataset.decode_flow(dataset.read_members(0))[0], QuantisedFlow)  # the fast path is the one tested
        for epoch in epochs:
            dataset.set_epoch(epoch)
            samples = [dataset[i] for i in range(len(dataset))]
            references = [reference_sample(dataset, i) for i in range(len(dataset))]
            for sample, reference in zip(samples, references):
                flips.add(reference.pop("transform").flip)
                assert sample.keys() == reference.keys() and sample["key"] == reference["key"]
                assert all(identical(sample[k], reference[k]) for k in sample if k != "key"), reference["key"]
                assert reference["flow"].abs().max() > 0.05  # real motion: a wrong tap or table would show
            batch = collate_skipping_failures(samples)
            if on_device:
                windows = [r["window"] for r in references]
                window_sizes |= {w.shape for w in windows}
                height, width = max(w.shape[0] for w in windows), max(w.shape[1] for w in windows)
                padded = np.stack([np.pad(w, ((0, height - w.shape[0]), (0, width - w.shape[1]), (0, 0)), mode="edge") for w in windows])
                assert identical(batch["window"], padded)
            pixels = "matrix" if on_device else "image"
            for name in (pixels, "points", "flow"):
                assert identical(batch[name], torch.stack([r[name] for r in references]))
            assert batch["key"] == [r["key"] for r in references] and batch["skipped"] == 0
    assert flips == {False, True}
    assert not on_device or len(window_sizes) > 1  # windows of several sizes: the padding is exercised


def test_quantised_flow_reads_what_the_dequantised_field_holds_around_holes(real_pairs):
    """Levels with an invalid region (the mask stored after the planes): the taps, the bilinear reading at every
    crop pixel, and the dense decodes (np.asarray, decode_flow_member) all equal the whole field dequantised."""
    dataset = PairShards(real_pairs, "train", Augmentation(64), 64)
    field, valid = decode_flow_member("flow.u8.lz4", dataset.read_members(0)[1])
    valid = valid.copy()
    valid[20:60, 30:90] = False
    name, data = encode_flow_member(np.ascontiguousarray(field), valid, "u8-lz4")
    dense, dense_valid = dequantised_reference(data)
    quantised, quantised_valid = decode_flow_member(name, data, quantised=True)
    assert isinstance(quantised, QuantisedFlow) and quantised.shape == dense.shape and identical(quantised_valid, dense_valid)
    assert identical(np.asarray(quantised), dense) and identical(np.ascontiguousarray(decode_flow_member(name, data)[0]), dense)
    assert not dense_valid.all()
    ys, xs = np.divmod(np.arange(dense.shape[0] * dense.shape[1]), dense.shape[1])
    assert identical(quantised[ys, xs], dense[ys, xs])
    rng = np.random.default_rng(0)
    for _ in range(6):
        transform = Augmentation(64).draw(dense.shape[:2], rng)
        points = np.stack(np.meshgrid(np.arange(64), np.arange(64)), -1).reshape(-1, 2).astype(np.float32)
        reference = bilinear_reference(dense, transform, points)
        assert identical(flow_at(quantised, transform, points), reference) and identical(flow_at(dense, transform, points), reference)
