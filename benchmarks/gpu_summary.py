"""The figures of ``benchmarks/gpu_check.sh``, read from what its stages wrote, as one summary.

Reads the two pretraining runs' CSV logs (``train/loss``, ``train/images_per_sec`` per step and, on a GPU,
``DeviceStatsMonitor``'s ``allocated_bytes.all.peak``), the nvidia-smi samples taken during the bf16 run, the
segmentation eval's ``results.json`` and ``pretrain_throughput.py``'s table. Prints the summary and writes it as
``gpu_check_summary.md`` and ``gpu_check_summary.json`` into ``--out``. A figure whose stage failed reads
``FAILED``; one that does not exist on the machine (peak GPU memory on a CPU) reads ``n/a``.

    python benchmarks/gpu_summary.py --work WORK --out OUT --warmup 50 --agreement-steps 50 --tolerance 0.01
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

from crossflow.files import write_text_atomic


def read_metrics(path: Path) -> dict[str, dict[int, float]]:
    """A CSVLogger ``metrics.csv`` as ``{column: {step: value}}`` (empty cells skipped)."""
    series: dict[str, dict[int, float]] = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            step = int(row["step"])
            for name, value in row.items():
                if name != "step" and value not in ("", None):
                    series.setdefault(name, {})[step] = float(value)
    return series


def throughput(metrics: dict[str, dict[int, float]], warmup: int) -> dict:
    """Steady-state images/s over the steps after ``warmup``: the median of the per-step rates, and the
    aggregate n / sum(1 / rate_i) (images over time, so loader stalls count in full)."""
    rates = [rate for step, rate in sorted(metrics.get("train/images_per_sec", {}).items()) if step >= warmup]
    if not rates:
        return {"median": None, "aggregate": None, "steps": 0}
    return {"median": statistics.median(rates), "aggregate": len(rates) / sum(1 / r for r in rates), "steps": len(rates)}


def peak_memory(metrics: dict[str, dict[int, float]]) -> dict:
    """Peak bytes allocated and reserved by PyTorch's CUDA allocator (DeviceStatsMonitor columns), or None."""
    peaks = {}
    for kind in ("allocated", "reserved"):
        columns = [values for name, values in metrics.items() if name.endswith(f"{kind}_bytes.all.peak")]
        peaks[kind] = max((max(values.values()) for values in columns), default=None)
    return peaks


def loss_agreement(reference: dict[int, float], other: dict[int, float], steps: int, tolerance: float) -> dict:
    """max and mean |L_other - L_reference| over the first ``steps`` steps both runs logged."""
    common = sorted(set(reference) & set(other))[:steps]
    if not common:
        return {"steps": 0, "max_abs": None, "mean_abs": None, "tolerance": tolerance, "passed": False}
    differences = [abs(other[s] - reference[s]) for s in common]
    return {
        "steps": len(common), "max_abs": max(differences), "mean_abs": statistics.fmean(differences),
        "reference_first": reference[common[0]], "reference_last": reference[common[-1]],
        "tolerance": tolerance, "passed": max(differences) <= tolerance,
    }


def nvidia_smi(path: Path) -> dict:
    """Mean and max GPU utilisation (%) and max memory used (MiB) from ``nvidia-smi --query-gpu=utilization.gpu,
    memory.used --format=csv,noheader,nounits`` samples; samples at 0% before the first busy one and after the last are
    dropped (the run's start-up before any step, and its teardown)."""
    samples = []
    for line in path.read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and all(p.replace(".", "").isdigit() for p in parts):
            samples.append((float(parts[0]), float(parts[1])))
    while samples and samples[0][0] == 0:
        samples.pop(0)
    while samples and samples[-1][0] == 0:
        samples.pop()
    if not samples:
        return {"samples": 0}
    utilisation = [u for u, _ in samples]
    return {"samples": len(samples), "util_mean": statistics.fmean(utilisation), "util_max": max(utilisation),
            "memory_used_max_mib": max(m for _, m in samples)}


def throughput_table(path: Path) -> list[dict]:
    """Rows of ``pretrain_throughput.py``'s markdown table."""
    rows = []
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and cells[0] not in ("config", "") and not cells[0].startswith("-"):
            rows.append({"config": cells[0], "crop": int(cells[1]), "batch": int(cells[2]), "seconds_per_step": float(cells[4]),
                         "images_per_sec": float(cells[5]), "backbone_share": cells[6], "head_loss_share": cells[7]})
    return rows


def fmt(value, spec: str, unit: str = "") -> str:
    return "FAILED" if value is None else f"{value:{spec}}{unit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="gpu_check.sh's working folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--machine", default="")
    parser.add_argument("--warmup", type=int, default=50, help="steps left out of the steady-state images/s")
    parser.add_argument("--agreement-steps", type=int, default=50)
    parser.add_argument("--tolerance", type=float, default=0.01, help="max |loss_bf16 - loss_fp32| over those steps")
    parser.add_argument("--throughput-config", default="paper", help="the pretrain_throughput.py row that matches the fits")
    args = parser.parse_args()
    work, gpu = args.work, not (args.work / "dry_run").exists()

    runs = {}
    for precision in ("bf16-mixed", "32-true"):
        path = work / f"fit_{precision}" / "csv" / "version_0" / "metrics.csv"
        runs[precision] = read_metrics(path) if path.exists() else None
    summary: dict = {"machine": args.machine, "mode": "gpu" if gpu else "dry-run (CPU)", "stages": {}}
    stages_file = work / "stages.tsv"
    if stages_file.exists():
        for line in stages_file.read_text().splitlines():
            name, status, seconds = line.split("\t")
            summary["stages"][name] = {"status": int(status), "seconds": float(seconds)}
    for precision, metrics in runs.items():
        summary[precision] = None if metrics is None else {
            "images_per_sec": throughput(metrics, args.warmup),
            "peak_memory_bytes": peak_memory(metrics) if gpu else None,
            "steps_logged": len(metrics.get("train/loss", {})),
        }
    if runs["bf16-mixed"] and runs["32-true"]:
        summary["loss_agreement"] = loss_agreement(runs["32-true"].get("train/loss", {}), runs["bf16-mixed"].get("train/loss", {}),
                                                   args.agreement_steps, args.tolerance)
    else:
        summary["loss_agreement"] = None
    smi = work / "nvidia_smi_bf16.csv"
    summary["nvidia_smi_bf16"] = nvidia_smi(smi) if smi.exists() else None
    seg = work / "seg" / "results.json"
    summary["seg_mIU"] = json.loads(seg.read_text())["metrics"]["mIU"] if seg.exists() else None
    table = work / "pretrain_throughput.md"
    summary["throughput_split"] = throughput_table(table) if table.exists() else None

    # Loader or GPU: the fit's loader-fed rate against the in-memory rate of the same shapes.
    fed = (summary["bf16-mixed"] or {}).get("images_per_sec", {}).get("median")
    in_memory = next((r["images_per_sec"] for r in summary["throughput_split"] or [] if r["config"] == args.throughput_config), None)
    if fed and in_memory:
        ratio = fed / in_memory
        verdict = "loader (the model waits for batches)" if ratio < 0.8 else "model compute (the loader keeps up)"
        summary["bottleneck"] = {"loader_fed": fed, "in_memory": in_memory, "ratio": ratio, "verdict": verdict}
    else:
        summary["bottleneck"] = None

    lines = [f"== crossflow GPU check ({summary['mode']}) ==", f"machine          {args.machine}"]
    for precision in ("bf16-mixed", "32-true"):
        run = summary[precision]
        if run is None:
            lines.append(f"{precision:<16} FAILED (no metrics.csv)")
            continue
        rate = run["images_per_sec"]
        lines.append(f"{precision:<16} images/s {fmt(rate['median'], '.1f')} median, {fmt(rate['aggregate'], '.1f')} aggregate"
                     f" (steps >= {args.warmup}, {rate['steps']} steps)")
        peaks = run["peak_memory_bytes"]
        memory = "n/a (CPU)" if peaks is None else (f"{fmt(peaks['allocated'] and peaks['allocated'] / 2**30, '.2f', ' GiB')} allocated, "
                                                    f"{fmt(peaks['reserved'] and peaks['reserved'] / 2**30, '.2f', ' GiB')} reserved")
        lines.append(f"{'':<16} peak GPU memory {memory}")
    agreement = summary["loss_agreement"]
    if agreement and agreement["steps"]:
        lines.append(f"loss agreement   bf16 vs fp32 over the first {agreement['steps']} steps: max |dL| {agreement['max_abs']:.2e}, "
                     f"mean {agreement['mean_abs']:.2e} (tolerance {agreement['tolerance']:g}): {'PASS' if agreement['passed'] else 'FAIL'};"
                     f" fp32 loss {agreement['reference_first']:.4f} -> {agreement['reference_last']:.4f}")
    else:
        lines.append("loss agreement   FAILED (a run logged no loss)")
    if summary["nvidia_smi_bf16"]:
        smi_summary = summary["nvidia_smi_bf16"]
        lines.append(f"nvidia-smi bf16  {smi_summary.get('samples', 0)} samples: utilisation mean {fmt(smi_summary.get('util_mean'), '.0f', '%')}, "
                     f"max {fmt(smi_summary.get('util_max'), '.0f', '%')}; memory used max {fmt(smi_summary.get('memory_used_max_mib'), '.0f', ' MiB')}")
    else:
        lines.append("nvidia-smi bf16  n/a" + (" (CPU)" if not gpu else " (no samples)"))
    lines.append(f"seg mIU          {fmt(summary['seg_mIU'], '.4f')} (configs/eval/demo_voc12_seg.yaml from the exported bf16 backbone)")
    for row in summary["throughput_split"] or []:
        lines.append(f"throughput split {row['config']} {row['crop']} px batch {row['batch']}: {row['seconds_per_step']:.4g} s/step, "
                     f"{row['images_per_sec']:.1f} images/s in memory; backbone {row['backbone_share']}, head + loss {row['head_loss_share']}")
    if not summary["throughput_split"]:
        lines.append("throughput split FAILED")
    bottleneck = summary["bottleneck"]
    lines.append("bottleneck       " + ("FAILED" if bottleneck is None else
                 f"{bottleneck['verdict']}: loader-fed {bottleneck['loader_fed']:.1f} images/s is {100 * bottleneck['ratio']:.0f}% "
                 f"of the in-memory {bottleneck['in_memory']:.1f}"))
    for name, stage in summary["stages"].items():
        lines.append(f"stage            {name:<12} {'ok' if stage['status'] == 0 else 'FAILED (exit ' + str(stage['status']) + ')'} {stage['seconds']:.0f} s")
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "gpu_check_summary.md", "```\n" + text + "\n```\n")
    write_text_atomic(args.out / "gpu_check_summary.json", json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
