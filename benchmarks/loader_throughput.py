"""Loader throughput: samples/s per core of ``PairShards`` + collate, and where a sample's time goes.

Reads real shards written by ``crossflow prepare`` from the clips in ``../shared/data/video`` (prepared
once into ``--work``: stored short side 256 for the paper config, 144 for the demo, as ``make pretrain``).
One process, one thread for torch and OpenCV, so the figure is per core. Times whole samples
(``dataset[i]`` and the batch's ``collate_skipping_failures``), then splits one sample into its stages:
read (the members' bytes), frame decode (JPEG -> RGB), flow decode (for ``flow.u8.lz4``: decompression and the
level tables; the levels are dequantised at the points' taps, in point sampling), augmentation (scale, crop, flip
of the frame, and the image normalisation) and point sampling (N points, their flow, eq. 6).
With ``--augment-on-device`` the workers only cut the stored pixels under each crop (``augment_on_device``
of the DataModule: the warp and normalisation run on the training device, outside these CPU figures).
Rows are kept per ``--label`` in the results file, so earlier code's figures stay in the same table.

    .venv/bin/python benchmarks/loader_throughput.py --label "after" [--samples 300] [--augment-on-device]
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from crossflow.data.pairs import Augmentation, PairShards, collate_skipping_failures

ROOT = Path(__file__).resolve().parents[1]
VIDEOS = ROOT.parent / "shared" / "data" / "video"
CONFIGS = {
    # name: (stored short side, crop, points, batch) as configs/pretrain/{cpof_alexnet,demo}.yaml and the Makefile
    "paper": (256, 224, 512, 96),
    "demo": (144, 128, 256, 32),
}
STAGES = ("read", "frame decode", "flow decode", "augmentation", "point sampling", "collate")


def prepared(work: Path, short_side: int, flow_format: str | None) -> Path:
    """Shards of the shared clips at ``short_side`` (made once with the real ``crossflow prepare``)."""
    out = work / (f"pairs-{short_side}" + (f"-{flow_format}" if flow_format else ""))
    if not (out / "index.json").is_file():
        if not VIDEOS.is_dir():
            sys.exit(f"no videos at {VIDEOS}: pass --work with prepared pairs-<short side> folders")
        command = [sys.executable, "-m", "crossflow.cli", "prepare", str(VIDEOS), "--out", str(out), "--short-side", str(short_side),
                   "--frames-per-video", "24", "--gap", "3", "--val-fraction", "0.15", "--workers", "1",
                   "--method", "dis:preset=fast", "--seed", "0"] + (["--flow-format", flow_format] if flow_format else [])
        subprocess.run(command, check=True)
    return out


def best_of(repeats: int, fn) -> float:
    """Fastest of ``repeats`` runs of ``fn`` in seconds (the least disturbed by other jobs on the machine)."""
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        timings.append(time.perf_counter() - start)
    return min(timings)


def whole_samples(dataset: PairShards, indices: list[int], batch: int) -> float:
    """Seconds per sample of ``dataset[i]`` plus its share of the batch collate."""

    def run():
        for start in range(0, len(indices), batch):
            collate_skipping_failures([dataset[i] for i in indices[start : start + batch]])

    return best_of(3, run) / len(indices)


def stage_seconds(dataset: PairShards, indices: list[int], batch: int) -> dict[str, float]:
    """Seconds per sample of each stage, run one stage at a time over all ``indices`` (best of 3)."""
    keys = [str(dataset.keys[i]) for i in indices]
    read = lambda: [dataset.read_members(i) for i in indices]  # noqa: E731
    members = read()
    frames = [dataset.decode_frame(m) for m in members]
    flows = [dataset.decode_flow(m) for m in members]
    rngs = lambda: [dataset.rng(key) for key in keys]  # noqa: E731
    augmented = [dataset.augment(f, fl, r) for f, fl, r in zip(frames, flows, rngs())]
    samples = [dataset.finish(a, key) for a, key in zip(augmented, keys)]
    timings = {
        "read": best_of(3, read),
        "frame decode": best_of(3, lambda: [dataset.decode_frame(m) for m in members]),
        "flow decode": best_of(3, lambda: [dataset.decode_flow(m) for m in members]),
        "augmentation": best_of(3, lambda: [dataset.augment(f, fl, r) for f, fl, r in zip(frames, flows, rngs())]),
        "point sampling": best_of(3, lambda: [dataset.finish(a, key) for a, key in zip(augmented, keys)]),
        "collate": best_of(3, lambda: [collate_skipping_failures(samples[s : s + batch]) for s in range(0, len(samples), batch)]),
    }
    return {name: seconds / len(indices) for name, seconds in timings.items()}


def merge_rows(path: Path, label: str, rows: list[str]) -> list[str]:
    """The table rows already in ``path`` whose label differs from ``label``, then ``rows``."""
    kept = []
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line.startswith("| ") and not line.startswith("| label")
                and not line.startswith(f"| {label} |")]
    return kept + rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="names this code's rows in the table (rows of other labels are kept)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--samples", type=int, default=300, help="samples timed per config (the shards' train split, cycled)")
    parser.add_argument("--flow-format", default=None, help="prepare's --flow-format for the shards (default: prepare's default)")
    parser.add_argument("--augment-on-device", action="store_true", help="workers cut windows; the warp is left to the device")
    parser.add_argument("--work", default=str(ROOT / "runs" / "benchmarks" / "loader"), help="where the prepared shards are kept")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "loader_throughput.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)

    rows = []
    for name in args.configs:
        short_side, crop, points, batch = CONFIGS[name]
        data = prepared(Path(args.work), short_side, args.flow_format)
        dataset = PairShards(data, "train", Augmentation(crop, (1.0, 1.5)), points, warp_on_device=args.augment_on_device)
        indices = [i % len(dataset) for i in range(args.samples)]
        dataset[0]  # warm-up: file cache, OpenCV's first calls
        per_sample = whole_samples(dataset, indices, batch)
        stages = stage_seconds(dataset, indices, batch)
        flow_member = dataset.flow_member_name(0)
        split = " | ".join(f"{1e3 * stages[s]:.3f}" for s in STAGES)
        rows.append(f"| {args.label} | {name} ({short_side} px stored, crop {crop}, N={points}) | {flow_member} | "
                    f"{1 / per_sample:.0f} | {1e3 * per_sample:.3f} | {split} |")
        print(rows[-1], flush=True)
    out = Path(args.out)
    rows = merge_rows(out, args.label, rows)
    table = "\n".join([
        "# Loader throughput per core",
        "",
        f"Machine: {platform.processor() or platform.machine()}, 2-core x86-64 CPU, 24 GB, no GPU; shared with other jobs; "
        "one process, torch and OpenCV at one thread. Shards: the real `crossflow prepare` (DIS fast, gap 3) of the clips in "
        "../shared/data/video. Whole samples: best of 3 passes; stages: each timed alone over the same samples (best of 3), "
        "so they need not sum exactly to the whole.",
        "",
        "| label | config | flow member | samples/s per core | ms / sample | " + " | ".join(f"{s} ms" for s in STAGES) + " |",
        "|---|---|---|---|---|" + "---|" * len(STAGES),
        *rows,
        "",
        f"Command: `.venv/bin/python benchmarks/loader_throughput.py --label LABEL --samples {args.samples}`.",
    ])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
