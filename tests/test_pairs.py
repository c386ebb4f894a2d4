"""Scale/crop/flip augmentation keeps frame and flow consistent; pixel sampling; batch contents."""

import json
import os
import shutil
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import webdataset as wds

from crossflow.data.pairs import (
    PAIRS_FORMAT,
    Augmentation,
    CropTransform,
    PairDataModule,
    PairShards,
    all_pixels,
    crop_valid,
    cut_window,
    flow_at,
    collate_skipping_failures,
    member_index_path,
    normalize_image,
    pad_windows,
    read_index,
    sample_points,
    warp_windows,
)
from crossflow.errors import InvalidInputError
from crossflow.models.backbone import IMAGE_MEAN, IMAGE_STD


def textured(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.random((height // 4, width // 4, 3)).astype(np.float32)
    return (cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC).clip(0, 1) * 255).astype(np.uint8)


def translated(frame: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """frame1 such that frame1(x + d) = frame0(x): the flow 0 -> 1 is the constant d."""
    matrix = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(frame, matrix, frame.shape[1::-1], flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def warp_back(frame1: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """frame1 sampled at x + flow(x): equals frame0 where the flow is right."""
    h, w = flow.shape[:2]
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(frame1, xs + flow[..., 0], ys + flow[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


@pytest.mark.parametrize("seed", range(6))
def test_known_translation_stays_correct_after_scale_crop_flip(seed):
    frame0 = textured(144, 192)
    dx, dy = 3.0, -2.0
    frame1 = translated(frame0, dx, dy)
    flow = np.broadcast_to(np.float32([dx, dy]), (144, 192, 2)).copy()
    valid = np.ones((144, 192), bool)
    augment = Augmentation(crop_size=96, scale_range=(0.8, 1.6))
    aug0, aug_flow, aug_valid = augment(frame0, flow, valid, np.random.default_rng(seed))
    aug1, _, _ = augment(frame1, flow, valid, np.random.default_rng(seed))  # same draws: same scale, crop, flip
    assert aug0.shape == (96, 96, 3) and aug_flow.shape == (96, 96, 2) and aug_valid.all()
    factor = np.abs(aug_flow[48, 48] / np.float32([dx, dy]))
    assert factor[0] == pytest.approx(factor[1], rel=0.02)  # one scale for both axes
    interior = (slice(8, -8), slice(8, -8))
    error = np.abs(warp_back(aug1, aug_flow).astype(float) - aug0.astype(float))[interior].mean()
    wrong = np.abs(warp_back(aug1, aug_flow * np.float32([-1, 1])).astype(float) - aug0.astype(float))[interior].mean()
    still = np.abs(aug1.astype(float) - aug0.astype(float))[interior].mean()
    assert error < 0.1 * still and wrong > 10 * error  # resampling leaves a few grey levels of error


def full_field_reference(augment: Augmentation, frame, flow, valid, rng):
    """The loader before issue 13, written out as the definition: resize the whole frame and flow field to the
    drawn scale (INTER_AREA shrinking), crop, flip (negating u); valid where the resized mask is ~1."""
    s = max(1.0, rng.uniform(*augment.scale_range)) if augment.train else 1.0
    factor = augment.crop_size * s / min(frame.shape[:2])
    size = (max(augment.crop_size, round(frame.shape[1] * factor)), max(augment.crop_size, round(frame.shape[0] * factor)))
    scale = np.array([size[0] / frame.shape[1], size[1] / frame.shape[0]], dtype=np.float32)
    frame = cv2.resize(frame, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
    flow = cv2.resize(np.where(valid[..., None], flow, 0), size, interpolation=cv2.INTER_LINEAR) * scale
    valid = cv2.resize(valid.astype(np.float32), size, interpolation=cv2.INTER_LINEAR) > 0.999
    top, left = rng.integers(0, size[1] - augment.crop_size + 1), rng.integers(0, size[0] - augment.crop_size + 1)
    window = (slice(top, top + augment.crop_size), slice(left, left + augment.crop_size))
    frame, flow, valid = frame[window], flow[window], valid[window]
    if rng.random() < 0.5:
        frame, flow, valid = frame[:, ::-1], flow[:, ::-1] * np.array([-1, 1], np.float32), valid[:, ::-1]
    return frame, flow, valid


def smooth_flow(height: int, width: int) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    return np.dstack([5 * np.sin(xs / 17) + ys / 20, 3 * np.cos(ys / 11) - xs / 40]).astype(np.float32)


@pytest.mark.parametrize("seed", range(8))
def test_points_and_flow_match_the_full_field_path(seed):
    """The same draw gives the same crop, the same points and the same flow at them as resizing the whole field."""
    frame, flow, valid = textured(150, 200, seed), smooth_flow(150, 200), np.ones((150, 200), bool)
    augment = Augmentation(crop_size=96, scale_range=(1.0, 1.6))  # factors 0.64-1.02: the INTER_AREA and the warp branches
    ref_frame, ref_flow, ref_valid = full_field_reference(augment, frame, flow, valid, rng := np.random.default_rng(seed))
    ref_points = sample_points(ref_valid, 64, rng)
    transform = augment.draw(frame.shape[:2], rng := np.random.default_rng(seed))
    points = sample_points(crop_valid(valid, transform), 64, rng)
    assert np.array_equal(points, ref_points)
    xs, ys = ref_points[:, 0].astype(int), ref_points[:, 1].astype(int)
    assert np.abs(flow_at(flow, transform, points) - ref_flow[ys, xs]).max() < 1e-3
    warped = augment.warp_frame(frame, transform).astype(float)
    assert np.abs(warped - ref_frame).mean() < 1.5 and np.abs(warped - ref_frame).max() < 40  # INTER_AREA vs bilinear at 0.75-1


@pytest.mark.parametrize("seed", range(4))
def test_valid_crop_pixels_match_the_full_field_path_around_holes(seed):
    flow, valid = smooth_flow(120, 160), np.ones((120, 160), bool)
    valid[30:70, 40:90] = False
    valid[::7, ::5] = False
    augment = Augmentation(crop_size=80, scale_range=(1.0, 1.5))
    _, ref_flow, ref_valid = full_field_reference(augment, textured(120, 160), flow, valid, np.random.default_rng(seed))
    transform = augment.draw(valid.shape, np.random.default_rng(seed))
    mask = crop_valid(valid, transform)
    assert (mask == ref_valid).mean() > 0.99 and not (mask & ~ref_valid).any()  # never valid where the reference is not
    dense = flow_at(flow, transform, all_pixels(80)).reshape(80, 80, 2)
    assert np.abs(dense - ref_flow)[mask].max() < 1e-3


def test_evaluation_is_a_centre_crop_at_scale_one():
    frame = textured(144, 192)
    flow = np.dstack(np.meshgrid(np.arange(192, dtype=np.float32), np.arange(144, dtype=np.float32)))  # flow = position
    out_frame, out_flow, _ = Augmentation(crop_size=144, train=False)(frame, flow, np.ones((144, 192), bool), np.random.default_rng(0))
    assert np.array_equal(out_frame, frame[:, 24:168]) and np.array_equal(out_flow, flow[:, 24:168])


def test_invalid_flow_is_not_smeared_into_valid_pixels():
    flow = np.zeros((100, 100, 2), np.float32)
    valid = np.ones((100, 100), bool)
    valid[:, :50] = False
    flow[:, :50] = 400.0  # garbage where invalid
    _, out_flow, out_valid = Augmentation(crop_size=100, scale_range=(1.3, 1.3))(textured(100, 100), flow, valid, np.random.default_rng(0))
    assert np.abs(out_flow[out_valid]).max() == 0.0 and out_valid.any() and not out_valid.all()


def test_points_are_drawn_among_valid_pixels_without_repeats():
    valid = np.zeros((32, 32), bool)
    valid[4:12, 20:30] = True
    points = sample_points(valid, 50, np.random.default_rng(0))
    assert valid[points[:, 1].astype(int), points[:, 0].astype(int)].all()
    assert len({tuple(p) for p in points}) == 50


def grey_levels(images) -> np.ndarray:
    """Normalised ``[..., 3, S, S]`` images -> 0-255 grey levels (the inverse of normalize_image)."""
    images = np.asarray(images, np.float64)
    return (images * np.float64(IMAGE_STD)[:, None, None] + np.float64(IMAGE_MEAN)[:, None, None]) * 255


def device_and_cpu_warps(augment: Augmentation, frame: np.ndarray, transforms: list[CropTransform]):
    """(warp_windows on a batch of the transforms' windows, normalize_image(warp_frame) of each), in grey levels."""
    windows, matrices = zip(*(cut_window(*augment.shrunk(frame, t)) for t in transforms))
    on_device = warp_windows(pad_windows(list(windows)), torch.from_numpy(np.stack(matrices)), augment.crop_size)
    cpu = torch.stack([normalize_image(augment.warp_frame(frame, t)) for t in transforms])
    return grey_levels(on_device), grey_levels(cpu)


@pytest.mark.parametrize("stored, area_shrink", [((72, 96), False), ((96, 72), False), ((300, 420), True)], ids=["wide", "tall", "area-shrink"])
def test_device_warp_matches_cv2_warp_affine_on_random_draws(stored, area_shrink):
    frame = textured(*stored, seed=stored[0])
    augment, rng = Augmentation(64), np.random.default_rng(0)
    transforms = [augment.draw(stored, rng) for _ in range(12)] + [Augmentation(64, train=False).draw(stored, rng)]
    assert all((min(t.scale) < augment.area_below) == area_shrink for t in transforms)
    on_device, cpu = device_and_cpu_warps(augment, frame, transforms)
    # cv2 rounds positions to 1/32 px and values to uint8, grid_sample neither: measured at most 0.51 levels apart
    assert np.abs(on_device - cpu).max() <= 1.0 and np.abs(on_device - cpu).mean() <= 0.3


def test_device_warp_replicates_the_frame_border_at_every_corner_and_flip():
    """Crops at the frame's edges read pixels beyond it (scale > 1 puts the first centre before pixel 0): both
    warps replicate the border, also where a window is padded to the batch's largest."""
    stored, size = (40, 56), 32
    frame = textured(*stored, seed=5)
    frame[:, -1], frame[-1, :] = 255, 0  # hard edges at the right and bottom borders
    transforms = [CropTransform(stored, (sx, sy), left, top, size, flip)
                  for (sx, sy) in ((1.0, 1.0), (1.7, 1.9), (0.8, 0.8)) for flip in (False, True)
                  for left, top in ((0, 0), (round(stored[1] * sx) - size, round(stored[0] * sy) - size))]
    on_device, cpu = device_and_cpu_warps(Augmentation(size, area_below=0.5), frame, transforms)
    assert np.abs(on_device - cpu).max() <= 1.0


def test_augmenting_on_the_device_keeps_the_draws_points_flow_and_keys(tiny_pairs):
    """The same samples through both paths: identical points, flow and keys; the images as close as the warps."""
    batches = {}
    for on_device in (False, True):
        data = PairDataModule(str(tiny_pairs), crop_size=48, batch_size=4, num_points=16, num_workers=0, augment_on_device=on_device)
        data.setup("fit")
        samples = [data.train_set[i] for i in range(4)]
        batches[on_device] = data.on_after_batch_transfer(collate_skipping_failures(samples), 0)
    cpu, device = batches[False], batches[True]
    assert "window" not in device and "matrix" not in device and device["image"].shape == cpu["image"].shape == (4, 3, 48, 48)
    assert device["key"] == cpu["key"] and torch.equal(device["points"], cpu["points"]) and torch.equal(device["flow"], cpu["flow"])
    assert np.abs(grey_levels(device["image"]) - grey_levels(cpu["image"])).max() <= 1.0


def test_missing_pairs_folder_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="crossflow prepare"):
        read_index(tmp_path / "nowhere")


def shard_items(pairs_dir, split: str) -> list:
    dataset = PairShards(pairs_dir, split, Augmentation(64, train=False), num_points=8)
    return list(zip(dataset.shard_of.tolist(), dataset.keys.tolist(), dataset.spans.tolist()))


def test_prepare_caches_member_offsets_and_a_damaged_or_stale_cache_is_rebuilt(tiny_pairs, tmp_path):
    pairs = tmp_path / "pairs"
    shutil.copytree(tiny_pairs, pairs)  # keeps mtimes: the caches still match their shards
    train, val = (sorted((pairs / split).glob("shard-*.tar"))[0] for split in ("train", "val"))
    for shard in (train, val):
        cached = json.loads(member_index_path(shard).read_text())["members"]
        with tarfile.open(shard) as tar, open(shard, "rb") as raw:
            members = tar.getmembers()
            assert len(members) == sum(len(m) for m in cached.values()) == 3 * len(cached) > 0
            for member in members:
                key, suffix = member.name.split(".", 1)
                offset, size = cached[key][suffix]
                raw.seek(offset)
                assert raw.read(size) == tar.extractfile(member).read()
    expected = {split: shard_items(pairs, split) for split in ("train", "val")}
    member_index_path(train).write_text('{"shard": [')  # damaged (an interrupted copy, say)
    os.utime(val, ns=(10**18, 10**18))  # the shard changed after its cache was written
    assert {split: shard_items(pairs, split) for split in ("train", "val")} == expected
    for shard in (train, val):
        stat = shard.stat()
        assert json.loads(member_index_path(shard).read_text())["shard"] == [stat.st_size, stat.st_mtime_ns]


def test_a_shard_cut_between_two_samples_is_refused_with_what_to_do(tiny_pairs, tmp_path):
    pairs = tmp_path / "pairs"
    shutil.copytree(tiny_pairs, pairs)
    shard = sorted((pairs / "train").glob("shard-*.tar"))[0]
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
        last_sample = next(m.offset for m in members if m.name.split(".")[0] == members[-1].name.split(".")[0])
    shard.write_bytes(shard.read_bytes()[:last_sample])  # reads as a valid tar of one sample fewer
    with pytest.raises(InvalidInputError, match=r"holds \d+ of the \d+ samples .* delete it and its record under records/"):
        PairShards(pairs, "train", Augmentation(64, train=False), num_points=8)


def pairs_with_failures(tiny_pairs: Path, out: Path, splits=("train",)) -> Path:
    """A prepared-pairs folder whose one shard (used by each of ``splits``) holds a good sample, one whose frame
    does not decode and one without its flow member."""
    shard = sorted((tiny_pairs / "train").glob("shard-*.tar"))[0]
    with tarfile.open(shard) as tar:
        first_key = tar.getnames()[0].split(".")[0]
        good = {m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers() if m.name.startswith(first_key + ".")}
    assert set(good) == {"frame.jpg", "flow.u8.lz4", "meta.json"}  # prepare's default --flow-format
    (out / "train").mkdir(parents=True)
    with wds.TarWriter(str(out / "train" / "shard-000000.tar"), encoder=False) as writer:
        writer.write({"__key__": "a_good", **good})
        writer.write({"__key__": "b_bad_jpeg", **good, "frame.jpg": b"not a jpeg"})
        writer.write({"__key__": "c_no_flow", "frame.jpg": good["frame.jpg"], "meta.json": good["meta.json"]})
    shards = {"num_samples": 3, "shards": [{"path": "train/shard-000000.tar", "num_samples": 3}]}
    (out / "index.json").write_text(json.dumps({"format": PAIRS_FORMAT, "splits": {split: shards for split in splits}}))
    return out


def test_undecodable_or_incomplete_samples_are_skipped_with_one_warning_per_shard(tiny_pairs, tmp_path):
    dataset = PairShards(pairs_with_failures(tiny_pairs, tmp_path), "train", Augmentation(64, train=False), num_points=8)
    with pytest.warns(UserWarning, match="skipping undecodable sample b_bad_jpeg") as warned:
        batch = collate_skipping_failures([dataset[i] for i in range(3)])
    assert len(warned) == 1 and dataset.failures == {tmp_path / "train" / "shard-000000.tar": 2}
    assert batch["key"] == ["a_good"] and batch["image"].shape == (1, 3, 64, 64) and batch["flow"].shape == (1, 8, 2)
    assert batch["skipped"] == 2 and collate_skipping_failures([dataset[1], dataset[2]]) == {"skipped": 2}
