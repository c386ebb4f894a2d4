"""Videos -> WebDataset shards of (frame, flow) pairs: ``crossflow prepare INPUT... --out DIR``.

Layout of ``DIR``::

    settings.json                 the options that shape the output, and how many shards each split has
    {train,val}/shard-NNNNNN.tar  samples <key>.frame.jpg (RGB), the flow t -> t+gap in pixels of the stored
                                  frame as the member of --flow-format (.flow.u8.lz4, .flow.i16.zst or
                                  .flow.png, see crossflow.flow.FLOW_FORMATS), .meta.json (its "flow_format"
                                  names it); key = <video-id>_<t:06d>
    {train,val}/shard-NNNNNN.tar.members.json   the shard's member offsets (see crossflow.data.pairs)
    records/{split}-NNNNNN.json   written right after its shard: marks that shard done
    skipped.jsonl                 skipped videos and pairs, with reasons
    index.json                    what the training DataModule reads

Videos are split by video (a hash of seed and name), ordered by video id and cut into fixed groups
of ``round(shard_size / frames_per_video)`` videos; a group makes one shard. Groups depend only on
the video list and the options, so a rerun skips finished groups (resume), ``--num-tasks T`` runs
every T-th group, and every way of running writes the same bytes (tar mtime 0, one OpenCV thread
and one decoder thread per process; frames come from seeking, crossflow.data.video). A video's
name is its path relative to the deepest folder holding all the videos, so ids, split and frames
stay the same when the video tree moves (another mount point, a copy); ``video-id`` is the first
16 hex digits of sha256 of the name.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import itertools
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import cv2
import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from crossflow.data.pairs import write_member_index
from crossflow.data.video import PacketIndex, VideoUnreadable, read_frames, scan_packets
from crossflow.errors import UserInputError
from crossflow.files import write_text_atomic
from crossflow.flow import FLOW_FORMATS, FLOW_METHODS, encode_flow_member, estimate_flow, resolve_flow_params

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".ogv")
SPLITS = ("train", "val")
# 2: video ids hash names relative to the video root; 3: meta.json gains "decode" (seek or sequential,
# see crossflow.data.video); frames, flow and every other field are the same bytes as in version 2;
# 4: meta.json gains "flow_format" and the flow member is --flow-format's (a version 3 folder is kitti-png); AVI
#    clips are read by seeking (their "decode" is "seek"; frames and flow the same bytes as the sequential pass)
FORMAT, FORMAT_VERSION = "crossflow-pairs", 4
# The default: the one of FLOW_FORMATS made for the loader's decode rate (issue 13); lossy, within sigma/10 of the
# loss's units (paper's sigma^2 = 0.0036) wherever |flow| <= 60 px: crossflow.flow.u8_error_bound.
DEFAULT_FLOW_FORMAT = "u8-lz4"
FLOW_FORMAT_HELP = (
    "the flow member: u8-lz4 (default; flow.u8.lz4: per image and component 256 log-spaced levels, LZ4; made to "
    "decode fastest; lossy: within sigma/10 of the loss's eq. 6 units where |flow| <= 60 px), i16-zstd (flow.i16.zst: "
    "the PNG's 1/64 px values, row deltas, zstd; lossless, about 45%% smaller than the PNG) or kitti-png (flow.png: "
    "KITTI 16-bit, as the paper stored it; slowest to decode)"
)
JPEG_QUALITY = 95
MIN_FRAME_STD = 2.0  # grey levels: a flatter frame (black, blank, deep fade) gives no usable flow
VIDEO_LIST_KEYS = ("inputs", "num_videos", "videos_sha256")  # settings compared as one "video list"


class PrepareError(UserInputError):
    """A problem with the inputs or DIR: reported as one line, with a non-zero exit status."""


class SkipVideo(Exception):
    """Raised inside a worker: the video is unusable, the message says why."""


# Inputs, hashing, split and groups


def find_videos(inputs: Iterable[str]) -> list[str]:
    """Absolute, sorted, unique paths of the videos that INPUTs name.

    A folder is searched recursively for files with a video extension, a ``.txt`` file lists
    paths one per line (relative ones are relative to the list; ``#`` starts a comment), any
    other file is taken as a video, anything else is a glob (video extensions only).
    """
    videos = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = [p for p in path.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file()]
            if not found:
                raise PrepareError(f"no videos found under {item} (extensions: {' '.join(VIDEO_EXTENSIONS)})")
        elif path.is_file():
            found = _read_list(path) if path.suffix.lower() == ".txt" else [path]
        else:
            found = [Path(p) for p in glob.glob(item, recursive=True)]
            found = [p for p in found if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file()]
            if not found:
                raise PrepareError(f"{item}: no such file or folder, and no video matches it as a glob")
        videos.extend(os.path.abspath(p) for p in found)
    return sorted(set(videos))


def _read_list(path: Path) -> list[Path]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [path.parent / line for line in lines if line]


def _digest(*parts) -> bytes:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).digest()


def video_names(videos: list[str]) -> dict[str, str]:
    """{absolute path: path relative to the deepest folder that holds every video}."""
    root = os.path.commonpath(videos) if len(videos) > 1 else os.path.dirname(videos[0])
    return {v: os.path.relpath(v, root) for v in videos}


def video_id(name: str) -> str:
    """16 hex digits of sha256 of the video's name: stable across runs, machines and mount points."""
    return hashlib.sha256(name.encode()).hexdigest()[:16]


def split_videos(names: dict[str, str], seed: int, val_fraction: float) -> dict[str, list[str]]:
    """Train/val paths by video: val when a uniform hash of (seed, name) is below ``val_fraction``.

    ``names`` maps path -> name (``video_names``). When ``val_fraction > 0`` draws no video (small
    sets), the video with the lowest hash goes to val, so val is never empty for two or more
    videos. Each split is ordered by video id.
    """
    score = {v: int.from_bytes(_digest(seed, "split", name)[:8], "big") / 2**64 for v, name in names.items()}
    val = {v for v in names if score[v] < val_fraction}
    if val_fraction > 0 and not val and len(names) > 1:
        val = {min(names, key=score.__getitem__)}
    train = [v for v in names if v not in val]
    return {split: sorted(paths, key=lambda v: video_id(names[v])) for split, paths in (("train", train), ("val", val))}


@dataclass(frozen=True)
class Group:
    """Videos that make one shard."""

    split: str
    index: int
    videos: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}"

    @property
    def shard(self) -> str:
        return f"{self.split}/shard-{self.index:06d}.tar"

    @property
    def record(self) -> str:
        return f"records/{self.name}.json"


def plan_groups(splits: dict[str, list[str]], videos_per_group: int) -> list[Group]:
    """Cut each split's videos into consecutive groups (train groups first, then val)."""
    groups = []
    for split in SPLITS:
        videos = splits[split]
        for index, start in enumerate(range(0, len(videos), videos_per_group)):
            groups.append(Group(split, index, tuple(videos[start : start + videos_per_group])))
    return groups


def sample_times(name: str, num_frames: int, frames_per_video: int, gap: int, seed: int) -> list[int]:
    """Sorted distinct t with ``t + gap < num_frames``, fixed by (seed, name); all of them when few."""
    valid = num_frames - gap
    if valid <= frames_per_video:
        return list(range(max(valid, 0)))
    rng = np.random.default_rng(int.from_bytes(_digest(seed, "frames", name)[:8], "big"))
    return sorted(rng.choice(valid, size=frames_per_video, replace=False).tolist())


# One video -> samples (runs in the workers)


@dataclass(frozen=True)
class VideoJob:
    """What a worker needs to turn one video into samples."""

    path: str
    name: str
    split: str
    method: str
    params: dict
    frames_per_video: int
    gap: int
    short_side: int
    seed: int
    flow_format: str


@dataclass
class VideoResult:
    """One video's samples, or why it (or some of its pairs) was skipped."""

    path: str
    name: str
    samples: list[dict] = field(default_factory=list)
    skipped_pairs: list[dict] = field(default_factory=list)  # {"t", "reason"}
    reason: str | None = None  # why the whole video was skipped
    num_frames: int | None = None


def process_video(job: VideoJob) -> VideoResult:
    """Decode one video and make its samples; never raises (a failure becomes the skip reason)."""
    try:
        return _process_video(job)
    except SkipVideo as skip:
        return VideoResult(job.path, job.name, reason=str(skip))
    except Exception as error:  # one bad file must not stop the run
        return VideoResult(job.path, job.name, reason=f"error: {type(error).__name__}: {error}")


def _process_video(job: VideoJob) -> VideoResult:
    if not os.path.isfile(job.path):
        raise SkipVideo("file not found")
    if os.path.getsize(job.path) == 0:
        raise SkipVideo("empty file (0 bytes)")
    index = count_frames(job.path)
    num_frames, fps = index.num_frames, index.fps
    if num_frames <= job.gap:
        raise SkipVideo(f"too short: {num_frames} decodable frames, need more than --gap {job.gap}")
    times = sample_times(job.name, num_frames, job.frames_per_video, job.gap, job.seed)
    frames, decode = read_frames(job.path, times + [t + job.gap for t in times], index)
    result = VideoResult(job.path, job.name, num_frames=num_frames)
    for t in times:
        if t not in frames or t + job.gap not in frames:
            result.skipped_pairs.append({"t": t, "reason": "frame not decodable on the second read"})
            continue
        pair = [resize_short_side(frames[i], job.short_side) for i in (t, t + job.gap)]
        if any(map(_is_flat, pair)):
            result.skipped_pairs.append({"t": t, "reason": f"near-constant frame (grey std < {MIN_FRAME_STD})"})
            continue
        meta = _meta(job, t, fps, num_frames, frames[t].shape, pair[0].shape) | {"decode": decode, "flow_format": job.flow_format}
        result.samples.append(make_sample(pair[0], pair[1], job.method, job.params, meta))
    if not result.samples:
        reasons = sorted({entry["reason"] for entry in result.skipped_pairs})
        raise SkipVideo(f"no usable pair: {'; '.join(reasons)}")
    return result


def _is_flat(frame: np.ndarray) -> bool:
    """A near-constant BGR frame (black, blank, deep fade): grey std below MIN_FRAME_STD."""
    return float(cv2.meanStdDev(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY))[1][0, 0]) < MIN_FRAME_STD


def count_frames(path: str) -> PacketIndex:
    """Frame count, fps and keyframes from a scan of the container's packets (nothing decoded)."""
    try:
        index = scan_packets(path)
    except VideoUnreadable:
        raise SkipVideo("cannot open as a video (not a video, damaged, or unsupported container/codec)") from None
    if index.num_frames == 0:
        raise SkipVideo("no decodable frames (damaged, or unsupported codec)")
    return index


def resize_short_side(frame: np.ndarray, short_side: int) -> np.ndarray:
    """Resize ``[H, W, C]`` so that min(H, W) == short_side (INTER_AREA shrinking, linear enlarging)."""
    height, width = frame.shape[:2]
    scale = short_side / min(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if size == (width, height):
        return frame
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def _meta(job: VideoJob, t: int, fps: float, num_frames: int, original: tuple, stored: tuple) -> dict:
    return {
        "source": job.path,
        "name": job.name,
        "video_id": video_id(job.name),
        "t": t,
        "gap": job.gap,
        "fps": fps,
        "estimator": job.method,
        "estimator_params": job.params,
        "original_size": [original[1], original[0]],
        "stored_size": [stored[1], stored[0]],
        "num_frames": num_frames,
    }


def make_sample(frame0: np.ndarray, frame1: np.ndarray, method: str, params: dict, meta: dict) -> dict:
    """WebDataset sample of BGR frames ``[H, W, 3]``: JPEG of frame0, flow 0 -> 1 in ``meta["flow_format"]``, meta."""
    flow = estimate_flow(cv2.cvtColor(frame0, cv2.COLOR_BGR2RGB), cv2.cvtColor(frame1, cv2.COLOR_BGR2RGB), method, **params)
    ok, jpeg = cv2.imencode(".jpg", frame0, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError("could not encode the frame as JPEG")
    flow_member, flow_bytes = encode_flow_member(flow, None, meta["flow_format"])
    return {
        "__key__": f"{meta['video_id']}_{meta['t']:06d}",
        "frame.jpg": jpeg.tobytes(),
        flow_member: flow_bytes,
        "meta.json": json.dumps(meta, sort_keys=True).encode(),
    }


# Processes


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One OpenCV and torch thread: parallelism comes from processes, so --workers changes no byte."""
    cv_threads, torch_threads = cv2.getNumThreads(), torch.get_num_threads()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(cv_threads)
        torch.set_num_threads(torch_threads)


def _init_worker() -> None:
    _quiet_decoders()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def _quiet_decoders() -> None:
    """Silence FFmpeg's and OpenCV's warnings on broken files: skipped.jsonl records them."""
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    if "OPENCV_LOG_LEVEL" not in os.environ:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


@contextlib.contextmanager
def _video_results(jobs: list[VideoJob], workers: int) -> Iterator[Iterator[VideoResult]]:
    """Results of :func:`process_video` in job order, from ``workers`` processes."""
    if workers <= 1 or len(jobs) <= 1:
        with _one_thread():
            yield map(process_video, jobs)
        return
    # forkserver: workers must not inherit the parent's OpenCV/CUDA threads, as they would with fork.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["crossflow.flow"])  # cv2 and torch, imported once
    with context.Pool(min(workers, len(jobs)), initializer=_init_worker) as pool:
        yield pool.imap(process_video, jobs)


# Writing


def write_json(path: Path, data) -> None:
    """``data`` as indented, key-sorted JSON onto ``path``, atomically."""
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def read_json(path: Path):
    """The JSON in ``path``, or None when it is missing or damaged."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_group(out: Path, group: Group, results: Iterable[VideoResult], on_video: Callable) -> dict:
    """Write a group's shard (temp name, then os.replace), then its record; returns the record."""
    shard = out / group.shard
    shard.parent.mkdir(parents=True, exist_ok=True)
    partial = shard.with_name(shard.name + ".partial")
    videos, skipped, num_samples = [], [], 0
    with open(partial, "wb") as stream:
        with wds.TarWriter(stream, encoder=False, mtime=0) as writer:
            for result in results:
                for sample in result.samples:
                    writer.write(sample)
                num_samples += len(result.samples)
                videos.append({"path": result.path, "pairs": len(result.samples), "num_frames": result.num_frames})
                skipped.extend(_skip_entries(result, group.split))
                on_video(result)
        stream.flush()
        os.fsync(stream.fileno())
    if num_samples:
        os.replace(partial, shard)
        write_member_index(shard)  # training then starts without scanning the tar headers
    else:
        partial.unlink()
    shard_path = group.shard if num_samples else None
    record = {"shard": shard_path, "num_samples": num_samples, "videos": videos, "skipped": skipped}
    write_json(out / group.record, record)
    return record


def _skip_entries(result: VideoResult, split: str) -> list[dict]:
    base = {"path": result.path, "video_id": video_id(result.name), "split": split}
    if result.reason:
        return [{**base, "reason": result.reason}]
    return [{**base, **entry} for entry in result.skipped_pairs]


def is_done(out: Path, group: Group) -> bool:
    """Whether ``group``'s record is written and its shard (if it has one) is there."""
    record = read_json(out / group.record)
    return record is not None and (record["shard"] is None or (out / record["shard"]).is_file())


# Index


def groups_of(plan: dict) -> list[Group]:
    """The groups (split, index; no videos) that a settings.json ``plan`` counts."""
    return [Group(split, index) for split in SPLITS for index in range(plan["groups"][split])]


def finalize(out: Path) -> dict | None:
    """Write skipped.jsonl and index.json once every group is done; returns the index.

    Returns None while groups are missing; raises PrepareError when no pair was written.
    """
    plan = read_json(out / "settings.json")
    groups = groups_of(plan)
    if not all(is_done(out, group) for group in groups):
        return None
    records = [(group, read_json(out / group.record)) for group in groups]
    skipped = [json.dumps(entry, sort_keys=True) + "\n" for _, record in records for entry in record["skipped"]]
    write_text_atomic(out / "skipped.jsonl", "".join(skipped))
    index = _index(plan, records)
    if index["counts"]["pairs"] == 0:
        raise PrepareError(
            f"no pairs written: all {index['counts']['videos']} videos were skipped; reasons in {out / 'skipped.jsonl'}"
        )
    write_json(out / "index.json", index)
    return index


def _index(plan: dict, records: list[tuple[Group, dict]]) -> dict:
    splits = {}
    for split in SPLITS:
        shards = [{"path": r["shard"], "num_samples": r["num_samples"]} for g, r in records if g.split == split and r["shard"]]
        splits[split] = {"num_samples": sum(s["num_samples"] for s in shards), "shards": shards}
    videos = [video for _, record in records for video in record["videos"]]
    videos_ok = sum(video["pairs"] > 0 for video in videos)
    return {
        "format": FORMAT,
        "format_version": plan["settings"]["format_version"],  # the folder's (an older one merged keeps its own)
        "settings": plan["settings"],
        "splits": splits,
        "counts": {
            "videos": len(videos),
            "videos_ok": videos_ok,
            "videos_skipped": len(videos) - videos_ok,
            "pairs": sum(video["pairs"] for video in videos),
            "pairs_skipped": sum("t" in entry for _, record in records for entry in record["skipped"]),
        },
    }


# Command line


def parse_method(spec: str) -> tuple[str, dict]:
    """``NAME[:KEY=VALUE,...]`` (e.g. ``dis:preset=fast``, ``raft:weights=raft.pth,model=small``)
    -> (name, full parameters). Values are read as JSON when they parse, else as strings."""
    name, _, options = spec.partition(":")
    params = {}
    for option in filter(None, options.split(",")):
        key, equals, value = option.partition("=")
        if not equals:
            raise PrepareError(f"bad flow method {spec!r}: write NAME:KEY=VALUE,... (e.g. dis:preset=fast)")
        with contextlib.suppress(ValueError):
            value = json.loads(value)
        params[key.strip()] = value
    try:
        params = resolve_flow_params(name, **params)
        if name != "raft":  # builds the estimator to check its parameters; raft is built in the workers
            blank = np.zeros((32, 32), np.uint8)
            estimate_flow(blank, blank, name, **params)
    except (ValueError, OSError, RuntimeError) as error:
        raise PrepareError(f"flow method {spec!r}: {error}") from None
    return name, params


def make_settings(args: argparse.Namespace, videos: list[str]) -> dict:
    """The options that shape the output (not workers or tasks), with a fingerprint of the video list."""
    method, params = parse_method(args.method)
    val_method, val_params = parse_method(args.val_method or args.method)
    return {
        "format_version": FORMAT_VERSION,
        "inputs": [os.path.abspath(item) for item in args.inputs],
        "num_videos": len(videos),
        "videos_sha256": hashlib.sha256("\n".join(videos).encode()).hexdigest(),
        "frames_per_video": args.frames_per_video,
        "gap": args.gap,
        "short_side": args.short_side,
        "method": method,
        "method_params": params,
        "val_method": val_method,
        "val_method_params": val_params,
        "val_fraction": args.val_fraction,
        "seed": args.seed,
        "shard_size": args.shard_size,
        "flow_format": args.flow_format,
    }


def flow_format_of(settings: dict) -> str:
    """The flow format of a folder's settings (``kitti-png`` for folders of format version 3 and older)."""
    return settings.get("flow_format", "kitti-png")


def _check_or_write_plan(out: Path, settings: dict, groups: list[Group]) -> None:
    old = read_json(out / "settings.json")
    if old is None:
        counts = {split: sum(group.split == split for group in groups) for split in SPLITS}
        write_json(out / "settings.json", {"format": FORMAT, "settings": settings, "groups": counts})
        return
    before = old["settings"]
    if before.get("format_version") == settings["format_version"] and flow_format_of(before) != settings["flow_format"]:
        raise PrepareError(
            f"{out} holds {flow_format_of(before)} flow, not {settings['flow_format']}: resume it with --flow-format "
            f"{flow_format_of(before)}, use a new --out, or convert it when finished (crossflow convert-pairs {out} --out NEW "
            f"--flow-format {settings['flow_format']})"
        )
    changed = [
        f"{key} {before.get(key)} -> {value}"
        for key, value in settings.items()
        if key not in VIDEO_LIST_KEYS and before.get(key) != value
    ]
    if before.get("videos_sha256") != settings["videos_sha256"]:
        changed.append(f"video list of {before.get('num_videos')} -> {settings['num_videos']} videos")
    if changed:
        raise PrepareError(
            f"{out} was prepared with other options ({', '.join(changed)}); use a new --out or the same options"
        )


def available_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``crossflow prepare`` options."""
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="video folder (recursive), glob, .txt list of paths, or video file")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    parser.add_argument("--frames-per-video", type=int, metavar="K", default=8, help="random frames t per video (default 8)")
    parser.add_argument("--gap", type=int, metavar="N", default=5, help="flow from t to t+gap (default 5)")
    parser.add_argument("--short-side", type=int, metavar="PX", default=256, help="stored frame short side in pixels (default 256)")
    parser.add_argument(
        "--method", default="dis", metavar="NAME[:K=V,...]",
        help=f"flow estimator, one of {', '.join(FLOW_METHODS)}, with options, e.g. dis:preset=fast (default dis = dis:preset=medium)",
    )
    parser.add_argument("--val-method", default=None, metavar="NAME[:K=V,...]", help="estimator for val videos (default: --method)")
    parser.add_argument("--flow-format", choices=list(FLOW_FORMATS), default=DEFAULT_FLOW_FORMAT, help=FLOW_FORMAT_HELP)
    parser.add_argument("--val-fraction", type=float, metavar="F", default=0.05, help="fraction of videos in val (default 0.05)")
    parser.add_argument("--shard-size", type=int, metavar="N", default=1000, help="about this many samples per shard (default 1000)")
    parser.add_argument("--workers", type=int, metavar="N", default=available_cores(), help="processes (default: all cores)")
    parser.add_argument("--seed", type=int, metavar="S", default=0, help="fixes frames and split (default 0)")
    parser.add_argument(
        "--num-tasks", type=int, metavar="T", default=_env_int("SLURM_ARRAY_TASK_COUNT", 1),
        help="split the work into T tasks (default $SLURM_ARRAY_TASK_COUNT or 1)",
    )
    parser.add_argument(
        "--task-index", type=int, metavar="I",
        default=_env_int("SLURM_ARRAY_TASK_ID", 0) - _env_int("SLURM_ARRAY_TASK_MIN", 0),
        help="this task, 0..T-1 (default $SLURM_ARRAY_TASK_ID - $SLURM_ARRAY_TASK_MIN, or 0)",
    )
    parser.add_argument(
        "--merge", action="store_true", help="only write index.json from the finished tasks' records (no INPUT needed)"
    )


def _validate(args: argparse.Namespace) -> None:
    if not args.merge and not args.inputs:
        raise PrepareError("no INPUT given: name video folders, globs, .txt lists or files (or use --merge)")
    for name in ("frames_per_video", "gap", "short_side", "shard_size", "num_tasks"):
        if getattr(args, name) < 1:
            raise PrepareError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.val_fraction <= 1:
        raise PrepareError("--val-fraction must lie in [0, 1]")
    if not 0 <= args.task_index < args.num_tasks:
        raise PrepareError(f"--task-index must lie in 0..{args.num_tasks - 1} (got {args.task_index})")


def run(args: argparse.Namespace) -> int:
    """``crossflow prepare``: returns the exit status (0 when the dataset holds at least one pair)."""
    try:
        _validate(args)
        return _merge(args.out) if args.merge else _prepare(args)
    except PrepareError as error:
        print(f"crossflow prepare: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("crossflow prepare: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def _prepare(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    _quiet_decoders()
    videos = find_videos(args.inputs)
    settings = make_settings(args, videos)
    names = video_names(videos)
    splits = split_videos(names, args.seed, args.val_fraction)
    groups = plan_groups(splits, max(1, round(args.shard_size / args.frames_per_video)))
    args.out.mkdir(parents=True, exist_ok=True)
    _check_or_write_plan(args.out, settings, groups)
    todo = [group for group in groups[args.task_index :: args.num_tasks] if not is_done(args.out, group)]
    pairs = _process_groups(args.out, todo, names, settings, args.workers, f"prepare {args.task_index + 1}/{args.num_tasks}")
    elapsed = time.perf_counter() - start
    print(f"this run: {pairs} pairs from {sum(len(g.videos) for g in todo)} videos in {elapsed:.1f} s ({pairs / elapsed:.2f} pairs/s)")
    return _merge(args.out, waiting_ok=True)


def _process_groups(out: Path, groups: list[Group], names: dict[str, str], settings: dict, workers: int, desc: str) -> int:
    """Process and write ``groups`` (``names``: path -> video name); returns the number of pairs written."""
    jobs = [_job(path, names[path], group.split, settings) for group in groups for path in group.videos]
    counts = {"pairs": 0, "skipped": 0}
    with tqdm(total=len(jobs), desc=desc, unit="video", mininterval=1.0) as bar:

        def on_video(result: VideoResult) -> None:
            counts["pairs"] += len(result.samples)
            counts["skipped"] += result.reason is not None
            bar.set_postfix(counts, refresh=False)
            bar.update()

        with _video_results(jobs, workers) as results:
            for group in groups:
                write_group(out, group, itertools.islice(results, len(group.videos)), on_video)
    return counts["pairs"]


def _job(path: str, name: str, split: str, settings: dict) -> VideoJob:
    prefix = "val_" if split == "val" else ""
    return VideoJob(
        path, name, split, settings[prefix + "method"], settings[prefix + "method_params"],
        settings["frames_per_video"], settings["gap"], settings["short_side"], settings["seed"], settings["flow_format"],
    )


def _merge(out: Path, waiting_ok: bool = False) -> int:
    plan = read_json(out / "settings.json")
    if plan is None:
        raise PrepareError(f"{out} holds no settings.json: nothing to merge; run prepare with INPUTs first")
    index = finalize(out)
    if index is None:
        missing = [g.name for g in groups_of(plan) if not is_done(out, g)]
        message = f"{len(missing)} of {len(groups_of(plan))} shards not done yet (e.g. {missing[0]})"
        if waiting_ok:
            print(f"{message}: the last task to finish writes index.json, or run again with --merge")
            return 0
        raise PrepareError(f"{message}; run the remaining tasks, then --merge again")
    counts, splits = index["counts"], index["splits"]
    print(
        f"{out}: videos {counts['videos_ok']} ok, {counts['videos_skipped']} skipped (see skipped.jsonl); "
        f"pairs {splits['train']['num_samples']} train, {splits['val']['num_samples']} val; "
        f"{sum(len(s['shards']) for s in splits.values())} shards -> {out / 'index.json'}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crossflow prepare", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    # Import by package name, so worker processes unpickle jobs from crossflow.data.prepare.
    from crossflow.data.prepare import main as package_main

    sys.exit(package_main())
