"""benchmarks/gpu_check.sh (issue 15): its CPU dry run runs every stage, and its summary holds every figure, each
equal to what the stage's own files say; the summary's readers checked against hand-computed values."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import statistics
import subprocess

import pytest

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("gpu_summary", REPO / "benchmarks" / "gpu_summary.py")
gpu_summary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_summary)


def test_throughput_median_and_aggregate_after_warmup(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train/images_per_sec,train/loss\n0,0,,6.0\n0,1,100.0,6.0\n0,2,50.0,\n0,3,25.0,\n0,3,,5.9\n")
    metrics = gpu_summary.read_metrics(path)
    assert metrics["train/loss"] == {0: 6.0, 1: 6.0, 3: 5.9}
    rate = gpu_summary.throughput(metrics, warmup=2)
    assert rate == {"median": 37.5, "aggregate": 2 / (1 / 50 + 1 / 25), "steps": 2}  # steps 2 and 3


def test_loss_agreement_over_common_steps():
    reference = {0: 6.20, 1: 6.19, 2: 6.18, 3: 6.00}
    other = {0: 6.2005, 1: 6.1920, 2: 6.1830, 3: 9.0}
    result = gpu_summary.loss_agreement(reference, other, steps=3, tolerance=0.002)
    assert result["steps"] == 3 and result["max_abs"] == pytest.approx(0.003) and not result["passed"]
    assert result["mean_abs"] == pytest.approx((0.0005 + 0.002 + 0.003) / 3)
    assert gpu_summary.loss_agreement(reference, other, steps=2, tolerance=0.0025)["passed"]


def test_nvidia_smi_drops_idle_start_and_end(tmp_path):
    path = tmp_path / "smi.csv"
    path.write_text("0, 500\n0, 900\n80, 20000\n0, 20000\n100, 30000\n40, 25000\n[N/A], [N/A]\n0, 900\n")
    assert gpu_summary.nvidia_smi(path) == {"samples": 4, "util_mean": pytest.approx(220 / 4), "util_max": 100.0,
                                            "memory_used_max_mib": 30000.0}


@pytest.mark.slow
def test_dry_run_summary_has_every_figure(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_WORK": str(work), "OUT": str(out)}
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    text = (out / "gpu_check_summary.md").read_text()
    assert text.strip("`\n") in result.stdout  # printed as written
    summary = json.loads((out / "gpu_check_summary.json").read_text())
    assert summary["mode"] == "dry-run (CPU)"
    assert {name: stage["status"] for name, stage in summary["stages"].items()} == dict.fromkeys(
        ["synth", "prepare", "fit_bf16-mixed", "fit_32-true", "export", "synth_voc", "seg_fit", "seg_test", "throughput"], 0)
    for precision in ("bf16-mixed", "32-true"):
        with (out / f"metrics_{precision}.csv").open() as handle:
            rates = [float(row["train/images_per_sec"]) for row in csv.DictReader(handle)
                     if row["train/images_per_sec"] and int(row["step"]) >= 2]
        assert rates and summary[precision]["images_per_sec"]["median"] == pytest.approx(statistics.median(rates))
        assert summary[precision]["peak_memory_bytes"] is None
    assert text.count("peak GPU memory n/a (CPU)") == 2
    agreement = summary["loss_agreement"]
    assert agreement["steps"] == 8 and agreement["passed"] and "loss agreement   bf16 vs fp32 over the first 8 steps" in text
    seg = json.loads((out / "seg_results.json").read_text())
    assert summary["seg_mIU"] == seg["metrics"]["mIU"] and 0 <= seg["metrics"]["mIU"] <= 1
    assert f"seg mIU          {seg['metrics']['mIU']:.4f}" in text
    (row,) = summary["throughput_split"]
    assert row["config"] == "tiny" and row["images_per_sec"] > 0 and "throughput split tiny 64 px batch 4" in text
    bottleneck = summary["bottleneck"]
    assert bottleneck["in_memory"] == row["images_per_sec"]
    assert bottleneck["ratio"] == pytest.approx(summary["bf16-mixed"]["images_per_sec"]["median"] / row["images_per_sec"])
    assert f"bottleneck       {bottleneck['verdict']}" in text
