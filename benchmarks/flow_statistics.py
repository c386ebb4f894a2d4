"""How the synthetic world's flow compares with real video's (issue 12, point 3).

Both sources go through the real ``crossflow prepare`` path at the demo's settings (short side 144,
8 random frames per video, t -> t+5, DIS medium, seed 0; the Makefile's ``demo-data``): the real
clips in ../shared/data/video, and ``crossflow synth videos`` clips (the demo's world, seed 0, MPEG-4
as the demo stores them). The synthetic clips' exact flow (``crossflow.data.render``, the
ground truth ``synth videos`` writes for the same pairs, KITTI 1/64 px) is measured too, so the
estimator's share of the difference shows.

Per source, over all pixels of every pair (not only valid ones: both the estimate and the exact
flow are defined everywhere):

- the histogram of ``||f'||``, the norm of the eq. 6-normalised vector ``(f'_u, f'_v)``
  (``crossflow.flow.normalize_flow``, M = 56, per component, as the loss sees it; the norm lies
  in [0, sqrt 2]), and the median and 90th percentile of the raw norm ``||f||`` in px;
- the share of pixels that move differently from the pair's dominant motion: an affine motion
  ``p -> A p`` fitted by RANSAC (``cv2.estimateAffine2D``, 1 px reprojection threshold) to the
  flow on a 4 px grid; a pixel moves differently when ``||f(p) - (A p - p)|| > 1 px`` (also 3 px);
  and, for comparison, against the median flow (a translation). Mean and median over pairs.

    .venv/bin/python benchmarks/flow_statistics.py   # ~2 min on 2 cores; writes results/flow_statistics.md
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from crossflow.files import write_text_atomic
from crossflow.flow import FLOW_MEMBERS, decode_flow_member, normalize_flow, read_flow

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CROSSFLOW = str(Path(sys.executable).parent / "crossflow")
BINS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, np.inf)  # edges of the ||f'|| histogram
PREPARE = ["--short-side", "144", "--frames-per-video", "8", "--gap", "5", "--method", "dis", "--seed", "0"]
GRID = 4  # px between the flow vectors the dominant motion is fitted to
THRESHOLDS = (1.0, 3.0)  # px: residuals above these "move differently"


def run(*args: str) -> None:
    subprocess.run([CROSSFLOW, *args], check=True, stdout=subprocess.DEVNULL)


def read_pairs(pairs_dir: Path) -> list[tuple[dict, np.ndarray]]:
    """(meta, DIS flow ``[H, W, 2]`` px) of every sample in the shards prepare wrote, in key order."""
    samples: dict[str, dict] = {}
    for shard in sorted(pairs_dir.glob("*/shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, field = member.name.partition(".")
                samples.setdefault(key, {})[field] = tar.extractfile(member).read()
    return [(json.loads(s["meta.json"]), np.ascontiguousarray(decode_flow_member(flow_member(s), s[flow_member(s)])[0]))
            for _, s in sorted(samples.items())]


def flow_member(sample: dict) -> str:
    """The name of the flow member a sample holds (whichever ``--flow-format`` prepare wrote)."""
    return next(name for name in FLOW_MEMBERS if name in sample)


def dominant_residuals(flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(``||f - affine||`` ``[H, W]``, ``||f - median f||`` ``[H, W]``) in px; the affine is a RANSAC fit on a grid."""
    height, width = flow.shape[:2]
    y, x = np.mgrid[:height, :width].astype(np.float32)
    grid = (slice(GRID // 2, None, GRID), slice(GRID // 2, None, GRID))
    source = np.stack([x[grid], y[grid]], axis=-1).reshape(-1, 2)
    cv2.setRNGSeed(0)  # OpenCV's RANSAC draws from its global RNG: fix it, so reruns agree
    affine, _ = cv2.estimateAffine2D(source, source + flow[grid].reshape(-1, 2), method=cv2.RANSAC,
                                     ransacReprojThreshold=1.0, maxIters=2000, confidence=0.995)
    if affine is None:  # degenerate (e.g. a textureless pair): translation only
        affine = np.array([[1, 0, 0], [0, 1, 0]], np.float64)
        affine[:, 2] = np.median(flow.reshape(-1, 2), axis=0)
    model_u = affine[0, 0] * x + affine[0, 1] * y + affine[0, 2] - x
    model_v = affine[1, 0] * x + affine[1, 1] * y + affine[1, 2] - y
    affine_residual = np.hypot(flow[..., 0] - model_u, flow[..., 1] - model_v)
    median = np.median(flow.reshape(-1, 2), axis=0)
    return affine_residual, np.hypot(*(flow - median).transpose(2, 0, 1))


class Statistics:
    """Pooled ``||f'||`` histogram and ``||f||`` values, and per-pair shares moving differently."""

    def __init__(self):
        self.counts = np.zeros(len(BINS) - 1, np.int64)
        self.norms: list[np.ndarray] = []
        self.shares: list[list[float]] = []  # per pair: affine > each threshold, then median > THRESHOLDS[0]

    def add(self, flow: np.ndarray) -> None:
        self.counts += np.histogram(np.linalg.norm(normalize_flow(flow), axis=-1), BINS)[0]
        self.norms.append(np.linalg.norm(flow, axis=-1).ravel())
        affine, median = dominant_residuals(flow)
        self.shares.append([float((affine > t).mean()) for t in THRESHOLDS] + [float((median > THRESHOLDS[0]).mean())])

    def row(self, name: str) -> str:
        norms, shares = np.concatenate(self.norms), np.array(self.shares)
        histogram = [f"{100 * c / self.counts.sum():.1f}" for c in self.counts]
        moving = [f"{100 * shares[:, 0].mean():.1f} / {100 * np.median(shares[:, 0]):.1f}",
                  f"{100 * shares[:, 1].mean():.1f} / {100 * np.median(shares[:, 1]):.1f}",
                  f"{100 * shares[:, 2].mean():.1f} / {100 * np.median(shares[:, 2]):.1f}"]
        pixels = f"{np.median(norms):.2f} / {np.percentile(norms, 90):.2f}"
        return "| " + " | ".join([name, str(len(shares)), *histogram, pixels, *moving]) + " |"


def header() -> list[str]:
    bins = [f"[{lo:g}, {hi:g})" if np.isfinite(hi) else f">= {lo:g}" for lo, hi in zip(BINS[:-1], BINS[1:])]
    columns = ["source", "pairs", *(f"% ‖f'‖ {b}" for b in bins), "‖f‖ px median / p90",
               "% moving differently: affine > 1 px, mean / median", "affine > 3 px", "median flow > 1 px"]
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-videos", type=int, default=128, help="synthetic clips (the demo has 256)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "flow_statistics.md"))
    args = parser.parse_args()
    videos = DATA / "video"
    if not videos.is_dir():
        sys.exit(f"{videos} is missing: this benchmark needs the shared real clips")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run("synth", "videos", "--out", str(tmp / "synth"), "--num-videos", str(args.num_videos), "--seed", "0", "--workers", "2")
        run("prepare", str(tmp / "synth" / "videos"), "--out", str(tmp / "synth_pairs"), "--val-fraction", "0.1", "--workers", "2", *PREPARE)
        run("prepare", str(videos), "--out", str(tmp / "real_pairs"), "--val-fraction", "0", "--workers", "2", *PREPARE)
        real_pairs, synth_pairs = read_pairs(tmp / "real_pairs"), read_pairs(tmp / "synth_pairs")
        per_video: dict[str, Statistics] = {}
        real, synth, truth = Statistics(), Statistics(), Statistics()
        for meta, flow in real_pairs:
            real.add(flow)
            per_video.setdefault(meta["name"], Statistics()).add(flow)
        for meta, flow in synth_pairs:
            synth.add(flow)
            clip = Path(meta["name"]).stem
            truth.add(read_flow(tmp / "synth" / "groundtruth" / clip / f"flow_{meta['t']:04d}.png")[0])
        sizes = sorted({tuple(meta["stored_size"]) for meta, _ in real_pairs})
    seconds = time.perf_counter() - start
    lines = ["# flow statistics: real video vs the synthetic world", "", *header()]
    lines += [real.row(f"real, all {len(per_video)} clips (DIS)")]
    lines += [per_video[name].row(f"&nbsp;&nbsp;{name}") for name in sorted(per_video)]
    lines += [synth.row(f"synthetic, {args.num_videos} demo-world clips (DIS on the MPEG-4 frames)"),
              truth.row("synthetic, same pairs, exact flow (render)")]
    lines += [
        "",
        "- Pairs: `crossflow prepare` at the demo's settings (short side 144, 8 random frames per video, "
        "t -> t+5, DIS medium, seed 0); synthetic clips `crossflow synth videos --seed 0` (192x144, 24 frames); "
        f"real clips stored at {', '.join(f'{w}x{h}' for w, h in sizes)}.",
        "- ‖f'‖: norm of the eq. 6-normalised vector (per component, M = 56), pooled over all pixels of all pairs "
        "(along one axis the bin edges are " + ", ".join(f"{b:g} = {np.expm1(b * np.log1p(56)):.2f} px" for b in BINS[1:-1]) + "); "
        "‖f‖: raw norm in px at that size.",
        f"- Moving differently: share of pixels whose flow differs from the pair's dominant motion by more than the "
        f"threshold; dominant motion = affine fitted by RANSAC (cv2.estimateAffine2D, 1 px threshold, {GRID} px grid) "
        "or the median flow; mean / median over pairs, in %.",
        "- Exact flow: the renderer's ground truth for the same (clip, t) pairs, stored as KITTI PNG (1/64 px); "
        "all pixels, occluded ones included.",
        f"- Run time {seconds:.0f} s on {platform.machine()} ({platform.processor() or 'CPU'}), OpenCV {cv2.__version__}; "
        "2-core x86-64 CPU, 24 GB, no GPU; shared with other jobs.",
    ]
    write_text_atomic(Path(args.out), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
