"""Pretraining startup: how long ``PairShards`` takes to index a split, scanning the tar headers
versus reading the ``<shard>.members.json`` offsets that ``crossflow prepare`` writes.

Shards are real WebDataset tars with the prepare layout (frame.jpg, flow.png, meta.json per sample)
and member sizes of the demo's order (the sizes do not matter to the index, only the member count).
Timed with a warm OS file cache, the best case for the scan; a cluster file system makes the scan
(one seek per member) slower still, the cache not.

    .venv/bin/python benchmarks/shard_index.py   # ~1 min; writes results/shard_index.md
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import webdataset as wds

from crossflow.data.pairs import PAIRS_FORMAT, Augmentation, PairShards, scan_members, write_member_index

ROOT = Path(__file__).resolve().parents[1]


def write_split(out: Path, shards: int, samples_per_shard: int) -> None:
    """``shards`` tars of ``samples_per_shard`` samples under ``out/train`` and an index.json naming them."""
    (out / "train").mkdir(parents=True)
    entries = []
    for s in range(shards):
        path = out / "train" / f"shard-{s:06d}.tar"
        with wds.TarWriter(str(path), encoder=False, mtime=0) as writer:
            for i in range(samples_per_shard):
                writer.write({"__key__": f"{s:06d}{i:06d}_000000", "frame.jpg": b"\0" * 20000,
                              "flow.png": b"\0" * 60000, "meta.json": b"{}"})  # fmt: skip
        entries.append({"path": f"train/shard-{s:06d}.tar", "num_samples": samples_per_shard})
    index = {"format": PAIRS_FORMAT, "splits": {"train": {"num_samples": shards * samples_per_shard, "shards": entries}}}
    (out / "index.json").write_text(json.dumps(index))


def best_seconds(function, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=40)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "shard_index.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder)
        write_split(data, args.shards, args.samples_per_shard)
        shards = sorted((data / "train").glob("*.tar"))
        scan = best_seconds(lambda: [scan_members(shard) for shard in shards])  # what every startup did before
        write = best_seconds(lambda: [write_member_index(shard) for shard in shards], repeats=1)
        cached = best_seconds(lambda: PairShards(data, "train", Augmentation(224), num_points=512))
    samples = args.shards * args.samples_per_shard
    per_sample_scan, per_sample_cached = scan / samples * 1e6, cached / samples * 1e6
    paper = 1_600_000
    report = (
        f"# Shard index at pretraining startup\n\nMachine: {platform.machine()}, {platform.processor() or 'cpu'}; "
        f"warm file cache. Command: `.venv/bin/python benchmarks/shard_index.py --shards {args.shards} "
        f"--samples-per-shard {args.samples_per_shard}`.\n\n"
        "| index from | split | seconds | µs / sample | at the paper's 1.6M pairs |\n|---|---|---|---|---|\n"
        f"| tar header scan (before) | {samples} samples, {args.shards} shards | {scan:.2f} | {per_sample_scan:.0f} | "
        f"{per_sample_scan * paper / 1e6:.0f} s |\n"
        f"| `<shard>.members.json` | same | {cached:.2f} | {per_sample_cached:.0f} | {per_sample_cached * paper / 1e6:.0f} s |\n\n"
        f"Writing the caches (what prepare adds per shard): {write / args.shards * 1000:.0f} ms per shard.\n"
    )
    args.out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
