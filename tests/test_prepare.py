"""crossflow.data.prepare on real clips plus broken files: counts, reasons, format, resume, tasks."""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import webdataset as wds

from crossflow.data import prepare
from crossflow.flow import FLOW_FORMATS, decode_flow_member, estimate_flow, normalize_flow, u8_error_bound

from .conftest import SHARED_DATA

DATA = SHARED_DATA
VIDEOS = DATA / "video"
REAL = ("realshort.mp4", "carphone_pristine.mp4", "megamind_cg.avi", "bikes.mp4", "chaplin.mp4")
BROKEN = {  # file -> start of its skip reason
    "empty.mp4": "empty file",
    "random.mp4": "cannot open",
    "truncated.mp4": "cannot open",
    "text.avi": "cannot open",
    "three_frames.avi": "too short",
    "black.avi": "no usable pair: near-constant frame",
}
OPTIONS = ["--frames-per-video", "2", "--short-side", "64", "--shard-size", "4", "--val-fraction", "0.3",
           "--val-method", "farneback", "--seed", "7", "--workers", "1"]  # fmt: skip
pytestmark = pytest.mark.skipif(not VIDEOS.is_dir(), reason=f"real video clips not found at {VIDEOS}")


def write_video(path, frames):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, frames[0].shape[1::-1])
    for frame in frames:
        writer.write(frame)
    writer.release()


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """A folder of 5 real clips (symlinks), 6 broken videos, and a non-video file."""
    folder = tmp_path_factory.mktemp("videos")
    for name in REAL:
        (folder / name).symlink_to(VIDEOS / name)
    rng = np.random.default_rng(0)
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "random.mp4").write_bytes(rng.bytes(50_000))
    (folder / "truncated.mp4").write_bytes((VIDEOS / "bikes.mp4").read_bytes()[:200_000])
    (folder / "text.avi").write_text("not a video\n" * 100)
    (folder / "notes.txt").write_text("ignored: not a video extension\n")
    sub = folder / "sub"
    sub.mkdir()
    write_video(sub / "three_frames.avi", rng.integers(0, 256, (3, 48, 64, 3), dtype=np.uint8))
    write_video(sub / "black.avi", np.zeros((20, 48, 64, 3), np.uint8))
    return folder


def run_prepare(*argv):
    parser = argparse.ArgumentParser()
    prepare.add_arguments(parser)
    return prepare.run(parser.parse_args([str(a) for a in argv]))


def outputs(out):
    """{relative path: bytes} of the shards, index and skip list: what a run leaves for training."""
    files = [*out.glob("*/shard-*.tar"), out / "index.json", out / "skipped.jsonl"]
    return {str(p.relative_to(out)): p.read_bytes() for p in files if p.exists()}


def samples(out, split):
    """Samples of a split, read with webdataset through index.json."""
    index = json.loads((out / "index.json").read_text())
    shards = [str(out / s["path"]) for s in index["splits"][split]["shards"]]
    return list(wds.WebDataset(shards, shardshuffle=False, empty_check=False)) if shards else []


def opencv_sequential_frames(path, last):
    """BGR frames 0..last of one sequential OpenCV decode (independent of crossflow.data.video)."""
    capture, frames = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG), []
    while len(frames) <= last and (read := capture.read())[0]:
        frames.append(read[1])
    capture.release()
    return frames


@pytest.fixture(scope="module")
def baseline(videos, tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline") / "pairs"
    assert run_prepare(videos, "--out", out, *OPTIONS) == 0
    return out


def test_counts_and_skip_reasons(baseline, capsys):
    index = json.loads((baseline / "index.json").read_text())
    assert index["format"] == "crossflow-pairs" and index["format_version"] == 4
    counts = index["counts"]
    assert (counts["videos"], counts["videos_ok"], counts["videos_skipped"]) == (11, 5, 6)
    assert counts["pairs"] == index["splits"]["train"]["num_samples"] + index["splits"]["val"]["num_samples"]
    assert counts["pairs"] + counts["pairs_skipped"] == 2 * 5
    skipped = [json.loads(line) for line in (baseline / "skipped.jsonl").read_text().splitlines()]
    reasons = {Path(entry["path"]).name: entry["reason"] for entry in skipped if "t" not in entry}
    assert reasons.keys() == BROKEN.keys()
    for name, start in BROKEN.items():
        assert reasons[name].startswith(start), (name, reasons[name])


def test_index_lists_every_shard_with_its_count(baseline):
    index = json.loads((baseline / "index.json").read_text())
    listed = set()
    for split in ("train", "val"):
        for shard in index["splits"][split]["shards"]:
            assert shard["path"].startswith(f"{split}/shard-") and shard["num_samples"] == len(
                list(wds.WebDataset(str(baseline / shard["path"]), shardshuffle=False))
            )
            listed.add(shard["path"])
    assert listed == {str(p.relative_to(baseline)) for p in baseline.glob("*/shard-*.tar")}
    assert not list(baseline.rglob("*.partial"))
    assert index["settings"]["method"] == "dis" and index["settings"]["val_method"] == "farneback"


def test_samples_hold_the_frame_its_flow_and_meta(baseline):
    for split, method in (("train", "dis"), ("val", "farneback")):
        for sample in samples(baseline, split):
            meta = json.loads(sample["meta.json"])
            assert re.fullmatch(r"[0-9a-f]{16}_\d{6}", sample["__key__"])
            assert sample["__key__"] == f"{meta['video_id']}_{meta['t']:06d}"
            assert meta["video_id"] == prepare.video_id(meta["name"]) and meta["estimator"] == method
            assert meta["gap"] == 5 and meta["t"] + 5 < meta["num_frames"] and meta["fps"] > 0
            frame = cv2.imdecode(np.frombuffer(sample["frame.jpg"], np.uint8), cv2.IMREAD_COLOR)
            assert meta["flow_format"] == "u8-lz4" and "flow.png" not in sample  # the default --flow-format
            flow, valid = decode_flow_member(FLOW_FORMATS["u8-lz4"], sample["flow.u8.lz4"])
            assert min(frame.shape[:2]) == 64 and list(frame.shape[1::-1]) == meta["stored_size"]
            assert flow.shape == frame.shape[:2] + (2,) and valid.all()


def test_stored_frame_is_rgb_correct_and_flow_is_at_stored_resolution(baseline):
    sample = next(s for s in samples(baseline, "train") + samples(baseline, "val") if b"carphone" in s["meta.json"])
    meta = json.loads(sample["meta.json"])
    t, gap = meta["t"], meta["gap"]
    frames = opencv_sequential_frames(meta["source"], t + gap)  # what prepare stored up to format version 2
    first, second = (prepare.resize_short_side(frames[i], 64) for i in (t, t + gap))
    assert meta["decode"] == "seek"  # an MP4 with timestamps: read by seeking, yet the same frame bytes
    assert sample["frame.jpg"] == cv2.imencode(".jpg", first, [cv2.IMWRITE_JPEG_QUALITY, prepare.JPEG_QUALITY])[1].tobytes()
    stored = cv2.imdecode(np.frombuffer(sample["frame.jpg"], np.uint8), cv2.IMREAD_COLOR)
    assert np.abs(stored.astype(int) - first).mean() < 3  # JPEG q95 of the same BGR frame (no channel swap)
    assert np.abs(stored.astype(int) - first[..., ::-1]).mean() > 3 * np.abs(stored.astype(int) - first).mean()
    rgb = [cv2.cvtColor(f, cv2.COLOR_BGR2RGB) for f in (first, second)]
    expected = estimate_flow(*rgb, meta["estimator"], **meta["estimator_params"])
    # u8-lz4 (the default): within half a quantisation level of g = sign(f) log(1 + |f|), in eq. 6 units
    stored_flow = decode_flow_member("flow.u8.lz4", sample["flow.u8.lz4"])[0]
    error = np.abs(normalize_flow(stored_flow) - normalize_flow(expected)).max()
    assert error <= u8_error_bound(sample["flow.u8.lz4"], max_vector_scale=1.0) + 1e-6 and error < 0.006  # sigma / 10


@pytest.mark.parametrize("flow_format", ["kitti-png", "i16-zstd"])
def test_lossless_flow_formats_store_the_estimate_at_one_64th_px(videos, tmp_path, flow_format):
    assert run_prepare(videos / "carphone_pristine.mp4", "--out", tmp_path, *OPTIONS, "--val-fraction", "0", "--flow-format", flow_format) == 0
    for sample in samples(tmp_path, "train"):
        meta = json.loads(sample["meta.json"])
        assert meta["flow_format"] == flow_format
        frames = opencv_sequential_frames(meta["source"], meta["t"] + meta["gap"])
        rgb = [cv2.cvtColor(prepare.resize_short_side(frames[i], 64), cv2.COLOR_BGR2RGB) for i in (meta["t"], meta["t"] + meta["gap"])]
        expected = estimate_flow(*rgb, meta["estimator"], **meta["estimator_params"])
        stored = decode_flow_member(FLOW_FORMATS[flow_format], sample[FLOW_FORMATS[flow_format]])[0]
        assert np.abs(stored - expected).max() <= 1 / 128 + 1e-6


def test_split_is_by_video(baseline, videos):
    ids = {split: {json.loads(s["meta.json"])["video_id"] for s in samples(baseline, split)} for split in ("train", "val")}
    produced = ids["train"] | ids["val"]
    assert len(produced) >= 3 and not ids["train"] & ids["val"]
    # the split is drawn over every input video, broken ones included (those then yield no pairs)
    names = prepare.video_names(prepare.find_videos([str(videos)]))
    expected = prepare.split_videos(names, 7, 0.3)
    for split in ("train", "val"):
        assert ids[split] == {prepare.video_id(names[v]) for v in expected[split]} & produced


def test_ids_split_and_frames_do_not_depend_on_where_the_tree_lives():
    clips = ["a.mp4", "sub/b.avi", "sub/deeper/c.mkv", "d.webm"]
    here, there = ([f"{root}/{clip}" for clip in clips] for root in ("/data/videos", "/mnt/node7/scratch/v"))
    names_here, names_there = prepare.video_names(here), prepare.video_names(there)
    assert list(names_here.values()) == list(names_there.values()) == clips
    relative = {split: [names_here[v] for v in paths] for split, paths in prepare.split_videos(names_here, 3, 0.5).items()}
    assert relative == {split: [names_there[v] for v in paths] for split, paths in prepare.split_videos(names_there, 3, 0.5).items()}
    assert prepare.video_names(["/data/videos/one.mp4"]) == {"/data/videos/one.mp4": "one.mp4"}


def test_same_options_give_the_same_bytes_with_more_workers(baseline, videos, tmp_path):
    assert run_prepare(videos, "--out", tmp_path, *OPTIONS, "--workers", "2") == 0
    assert outputs(tmp_path) == outputs(baseline)


def test_another_seed_gives_other_samples(baseline, videos, tmp_path):
    assert run_prepare(videos, "--out", tmp_path, *OPTIONS, "--seed", "8") == 0
    keys = {s["__key__"] for split in ("train", "val") for s in samples(tmp_path, split)}
    assert keys != {s["__key__"] for split in ("train", "val") for s in samples(baseline, split)}


def test_resume_after_lost_shard_and_stale_partial(baseline, videos, tmp_path):
    out = tmp_path / "pairs"
    shutil.copytree(baseline, out)
    records = sorted(out.glob("records/train-*.json"))
    shards = [json.loads(r.read_text())["shard"] for r in records]
    first, second = [i for i, shard in enumerate(shards) if shard][:2]
    (out / shards[first]).unlink()  # shard gone: the group is redone
    records[second].unlink()  # record gone: the group is redone, over a stale partial shard
    (out / (shards[second] + ".partial")).write_bytes(b"half a tar")
    (out / "index.json").unlink()
    assert run_prepare(videos, "--out", out, *OPTIONS) == 0
    assert outputs(out) == outputs(baseline)
    assert not list(out.rglob("*.partial"))


def test_kill_and_rerun_gives_an_uninterrupted_run(baseline, videos, tmp_path):
    command = [sys.executable, "-m", "crossflow.data.prepare", str(videos), "--out", str(tmp_path), *OPTIONS]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob("records/*.json")) and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert list(tmp_path.glob("records/*.json")), "no shard was finished within 60 s"
    assert not (tmp_path / "index.json").exists(), "the run finished before it could be killed"
    assert run_prepare(videos, "--out", tmp_path, *OPTIONS) == 0
    assert outputs(tmp_path) == outputs(baseline)


def test_two_tasks_then_merge_equal_one_run(baseline, videos, tmp_path, capsys):
    assert run_prepare(videos, "--out", tmp_path, *OPTIONS, "--num-tasks", "2", "--task-index", "0") == 0
    assert "not done yet" in capsys.readouterr().out and not (tmp_path / "index.json").exists()
    assert run_prepare("--merge", "--out", tmp_path) == 2
    assert run_prepare(videos, "--out", tmp_path, *OPTIONS, "--num-tasks", "2", "--task-index", "1") == 0
    assert outputs(tmp_path) == outputs(baseline)  # the last task wrote the index
    (tmp_path / "index.json").unlink()
    assert run_prepare("--merge", "--out", tmp_path) == 0
    assert outputs(tmp_path) == outputs(baseline)


def test_other_options_on_an_existing_dir_are_refused(baseline, videos, tmp_path, capsys):
    out = tmp_path / "pairs"
    shutil.copytree(baseline, out)
    assert run_prepare(videos, "--out", out, *OPTIONS, "--gap", "3") == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "gap 5 -> 3" in error and "use a new --out or the same options" in error


def test_no_videos_names_the_input(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run_prepare(tmp_path / "empty", "--out", tmp_path / "out") == 2
    assert f"no videos found under {tmp_path / 'empty'}" in capsys.readouterr().err


def test_only_broken_videos_fail_with_the_reason(videos, tmp_path, capsys):
    assert run_prepare(videos / "empty.mp4", videos / "text.avi", "--out", tmp_path, "--workers", "1") == 2
    error = capsys.readouterr().err
    assert "no pairs written: all 2 videos were skipped" in error
    assert len((tmp_path / "skipped.jsonl").read_text().splitlines()) == 2


def test_inputs_as_list_file_and_glob(videos, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# clips\n{videos / 'realshort.mp4'}\nmissing.mp4\n")
    found = prepare.find_videos([str(listing), str(videos / "sub" / "*.avi")])
    assert found == sorted([str(videos / "realshort.mp4"), str(tmp_path / "missing.mp4"),
                            str(videos / "sub" / "black.avi"), str(videos / "sub" / "three_frames.avi")])  # fmt: skip
    with pytest.raises(prepare.PrepareError, match="no such file or folder"):
        prepare.find_videos([str(tmp_path / "nothing*.mp4")])


def test_sample_times():
    times = prepare.sample_times("/v.mp4", 100, 8, 5, seed=0)
    assert len(times) == 8 == len(set(times)) and times == sorted(times) and max(times) < 95
    assert times == prepare.sample_times("/v.mp4", 100, 8, 5, seed=0)
    assert times != prepare.sample_times("/v.mp4", 100, 8, 5, seed=1)
    assert prepare.sample_times("/v.mp4", 9, 8, 5, seed=0) == [0, 1, 2, 3]


def test_parse_method():
    assert prepare.parse_method("dis") == ("dis", {"preset": "medium"})
    assert prepare.parse_method("dis:preset=fast") == ("dis", {"preset": "fast"})
    assert prepare.parse_method("farneback:winSize=9,numLevels=3") == ("farneback", {"winSize": 9, "numLevels": 3})
    for bad in ("dis:fast", "sift", "farneback:bogus=1", "raft"):
        with pytest.raises(prepare.PrepareError):
            prepare.parse_method(bad)
