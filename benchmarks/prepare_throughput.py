"""Throughput and accuracy of each flow estimator in ``crossflow prepare``.

For every estimator: pairs per CPU-second (= pairs/s per core, robust to a busy machine) and
pairs/s of wall time, one process with one OpenCV thread, for the whole prepare path (decode,
resize, flow, JPEG + KITTI PNG, tar) on the real clips in ../shared/data/video at short side 256; mean
endpoint error (px) on the five Middlebury sequences (grey frames) and on rendered synthetic
clips (``crossflow.data.render``, exact flow, short side 256), with the CPU time per flow.

Stages: the shares of prepare's CPU time spent decoding (packet scan + frames) and in the flow
estimator, with the rate the estimator alone would allow (a ceiling no faster decoding can pass); and
the time to prepare 8 pairs from a 10-minute video and from a 30-second one, both encoded here
from a shared clip (H.264, keyframe interval 250), so cost is seen to follow pairs, not length.

    .venv/bin/python benchmarks/prepare_throughput.py   # ~5 min on one core; writes results/prepare_throughput.md
    .venv/bin/python benchmarks/prepare_throughput.py --prepare-only --methods dis:preset=fast dis:preset=medium
        # only the prepare throughput and stage shares of those rows, printed (nothing written)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Iterator

import av
import cv2
import numpy as np

from crossflow.data import prepare
from crossflow.flow import estimate_flow, read_flo

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SEQUENCES = ("Dimetrodon", "Grove2", "Hydrangea", "RubberWhale", "Urban2")
LONG_SOURCE = "chaplin.mp4"  # looped into the 30-second and 10-minute videos
METHODS = ("dis:preset=ultrafast", "dis:preset=fast", "dis:preset=medium", "farneback", "tvl1", "deepflow")


def prepare_rate(
    method: str, frames_per_video: int, short_side: int, videos: Path = DATA / "video", flow_format: str | None = None
) -> tuple[int, float, float]:
    """(pairs, wall seconds, CPU seconds) of one single-process ``prepare`` run over ``videos``
    (``flow_format``: prepare's --flow-format, None for its default)."""
    parser = argparse.ArgumentParser()
    prepare.add_arguments(parser)
    with tempfile.TemporaryDirectory() as out:
        argv = [str(videos), "--out", out, "--method", method, "--val-fraction", "0", "--workers", "1",
                "--frames-per-video", str(frames_per_video), "--short-side", str(short_side)]  # fmt: skip
        argv += ["--flow-format", flow_format] if flow_format else []
        start, cpu = time.perf_counter(), time.process_time()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            status = prepare.run(parser.parse_args(argv))
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        if status != 0:
            raise RuntimeError(f"prepare --method {method} failed with status {status}")
        return json.loads((Path(out) / "index.json").read_text())["counts"]["pairs"], seconds, cpu


# prepare's functions timed by stage_timer, by stage: decoding (packet scan + frames) and the flow estimator
STAGES = {"decoding": ("count_frames", "read_frames"), "flow": ("estimate_flow",)}


@contextlib.contextmanager
def stage_timer() -> Iterator[dict[str, float]]:
    """CPU seconds spent in each of prepare's STAGES, summed while the block runs (one process: --workers 1)."""
    spent = dict.fromkeys(STAGES, 0.0)
    originals = {name: getattr(prepare, name) for names in STAGES.values() for name in names}

    def timed(stage, function):
        def call(*args, **kwargs):
            start = time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                spent[stage] += time.process_time() - start
        return call

    for stage, names in STAGES.items():
        for name in names:
            setattr(prepare, name, timed(stage, originals[name]))
    try:
        yield spent
    finally:
        for name, function in originals.items():
            setattr(prepare, name, function)


def stages_line(pairs: int, cpu: float, spent: dict[str, float]) -> str:
    """Each stage's share of prepare's CPU time, and the rate the flow estimator alone would allow."""
    return (f"{spent['decoding'] / cpu:.0%} decoding, {spent['flow'] / cpu:.0%} flow; "
            f"the flow alone allows {pairs / spent['flow']:.1f} pairs per CPU-s")  # fmt: skip


def encode_loop(source: Path, out: Path, seconds: float, keyframe_interval: int = 250) -> Path:
    """H.264 video of ``seconds`` made by looping ``source`` (forwards, then backwards, no jump)."""
    with av.open(str(source)) as clip:
        stream = clip.streams.video[0]
        fps = stream.average_rate
        frames = [frame.to_ndarray(format="bgr24") for frame in clip.decode(stream)]
    loop = frames + frames[-2:0:-1]
    with av.open(str(out), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"preset": "veryfast", "crf": "23"})
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        stream.codec_context.gop_size = keyframe_interval
        stream.codec_context.options = {"x264-params": f"keyint={keyframe_interval}:min-keyint={keyframe_interval}:scenecut=0"}
        for i in range(round(seconds * fps)):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(loop[i % len(loop)], format="bgr24")))
        container.mux(stream.encode())
    return out


def length_costs(method: str, short_side: int) -> dict[str, tuple[int, float, float]]:
    """{"30 s" | "10 min": (pairs, wall s, CPU s)} of prepare with 8 pairs on looped videos of the clip."""
    costs = {}
    with tempfile.TemporaryDirectory() as folder:
        for label, seconds in (("30 s", 30), ("10 min", 600)):
            videos = Path(folder) / label.replace(" ", "")
            videos.mkdir()
            encode_loop(DATA / "video" / LONG_SOURCE, videos / "loop.mp4", seconds)
            costs[label] = prepare_rate(method, 8, short_side, videos)
    return costs


def epes(method: str, pairs) -> tuple[list[float], float]:
    """(mean EPE of each pair, CPU ms per flow) over ``pairs`` of (frame0, frame1, flow, valid)."""
    name, params = prepare.parse_method(method)
    errors, seconds = [], 0.0
    for frame0, frame1, gt, valid in pairs:
        start = time.process_time()
        flow = estimate_flow(frame0, frame1, name, **params)
        seconds += time.process_time() - start
        errors.append(float(np.linalg.norm(flow - gt, axis=-1)[valid].mean()))
    return errors, 1000 * seconds / len(errors)


def middlebury_pairs() -> list[tuple]:
    pairs = []
    for sequence in SEQUENCES:
        folder = DATA / "flow" / "middlebury" / sequence
        frames = [cv2.imread(str(folder / f"frame1{i}.png"), cv2.IMREAD_GRAYSCALE) for i in (0, 1)]
        pairs.append((*frames, *read_flo(folder / "flow10.flo")))
    return pairs


def synthetic_pairs(num_clips: int, short_side: int) -> list[tuple] | None:
    """Rendered RGB frame pairs t -> t+5 with exact flow, or None without the synthetic world."""
    try:
        from crossflow.data.render import render_clip
    except ImportError:
        return None
    pairs = []
    for seed in range(num_clips):
        clip = render_clip(seed, num_frames=18, size=(round(short_side * 4 / 3), short_side), gap=5)
        pairs += [(clip.frames[t], clip.frames[t + 5], *clip.flow(t)) for t in (0, 6, 12)]
    return pairs


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def table(rows: list[dict], synthetic: bool) -> str:
    header = ["estimator", "prepare pairs per CPU-s", "prepare pairs/s (wall)", "Middlebury EPE (5 seq.)", "RubberWhale EPE", "CPU ms/flow (Middlebury)"]
    header += ["synthetic EPE", "CPU ms/flow (synthetic)"] if synthetic else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["method"], f"{row['rate']:.2f}", f"{row['wall_rate']:.2f}", f"{row['middlebury']:.3f}", f"{row['rubberwhale']:.3f}", f"{row['ms']:.0f}"]
        cells += [f"{row['synthetic']:.3f}", f"{row['synthetic_ms']:.0f}"] if synthetic else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--frames-per-video", type=int, default=8, help="pairs per clip in the prepare runs (paper: 8)")
    parser.add_argument("--short-side", type=int, default=256)
    parser.add_argument("--synthetic-clips", type=int, default=2, help="rendered clips (3 pairs each)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prepare_throughput.md")
    parser.add_argument("--flow-format", default=None, help="prepare's --flow-format (default: prepare's default)")
    parser.add_argument("--prepare-only", action="store_true", help="print only prepare's rates and decoding share; write nothing")
    args = parser.parse_args()
    if not (DATA / "video").is_dir():
        raise SystemExit(f"real data not found at {DATA}: this benchmark needs ../shared/data (see its README)")
    cv2.setNumThreads(1)  # per-core figures
    if args.prepare_only:
        for method in args.methods:
            with stage_timer() as spent:
                pairs, seconds, cpu = prepare_rate(method, args.frames_per_video, args.short_side, flow_format=args.flow_format)
            print(f"{method}: {pairs / cpu:.2f} pairs per CPU-s, {pairs / seconds:.2f} pairs/s wall "
                  f"({pairs} pairs, {cpu:.2f} CPU-s, {stages_line(pairs, cpu, spent)})", flush=True)  # fmt: skip
        return
    middlebury, synthetic = middlebury_pairs(), synthetic_pairs(args.synthetic_clips, args.short_side)
    rows = []
    for method in args.methods:
        with stage_timer() as spent:
            pairs, seconds, cpu = prepare_rate(method, args.frames_per_video, args.short_side, flow_format=args.flow_format)
        row = {"method": method, "rate": pairs / cpu, "wall_rate": pairs / seconds, "stages": stages_line(pairs, cpu, spent)}
        errors, row["ms"] = epes(method, middlebury)
        row["middlebury"], row["rubberwhale"] = np.mean(errors), errors[SEQUENCES.index("RubberWhale")]
        if synthetic:
            errors, row["synthetic_ms"] = epes(method, synthetic)
            row["synthetic"] = np.mean(errors)
        rows.append(row)
        print(f"{method}: {pairs} pairs in {seconds:.1f} s ({cpu:.1f} CPU-s, {row['stages']})", flush=True)
    zero = np.mean([np.linalg.norm(gt, axis=-1)[valid].mean() for *_, gt, valid in middlebury])
    notes = [
        f"Machine: {cpu_name()}, OpenCV {cv2.__version__}, PyAV {av.__version__}, one process, one OpenCV and one decoder thread.",
        f"Prepare: the 7 real clips in shared/data/video, {args.frames_per_video} pairs per clip, short side "
        f"{args.short_side}, gap 5, flow member {args.flow_format or 'of prepare default'}; frame counts from a packet "
        "scan, frames by seeking (crossflow.data.video).",
        "Stages (of prepare's CPU time; decoding = packet scan + frames): "
        + "; ".join(f"{row['method']} {row['stages']}" for row in rows) + ".",
    ]
    costs = length_costs("dis:preset=medium", args.short_side)
    notes += [
        f"Length: 8 pairs (DIS medium) from {LONG_SOURCE} looped to 30 s and to 10 min (H.264, keyframe interval 250): "
        + ", ".join(f"{label} {cpu:.2f} CPU-s ({pairs} pairs, {seconds:.2f} s wall)" for label, (pairs, seconds, cpu) in costs.items())
        + f"; ratio {costs['10 min'][2] / costs['30 s'][2]:.2f}x.",
        f"EPE: mean endpoint error in px over valid pixels, averaged over pairs; zero flow scores {zero:.3f} on Middlebury.",
    ]
    if synthetic:
        notes.append(f"Synthetic: {args.synthetic_clips} rendered clips ({len(synthetic)} pairs, gap 5), clean RGB frames, exact flow.")
    report = table(rows, synthetic is not None) + "\n\n" + "\n".join(f"- {note}" for note in notes) + "\n"
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("# prepare throughput\n\n" + report)


if __name__ == "__main__":
    main()
