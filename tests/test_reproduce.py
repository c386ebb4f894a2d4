"""`make reproduce-demo`, shrunk to minutes: synth, prepare, both pretrainings, export, evals, tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import REPO

# The direct baseline is the pretrained row: its objective is not demo.yaml's default, so the row proves that the
# Makefile's objective switch reaches the fit (cross_pixel, the default, would pass without it).
ROWS = ("random", "flow_classification")
BENCHMARKS = ("voc07_cls", "in1k_linear")
# One pretraining seed, not the default 0, so the test proves that the Makefile's seed axis reaches the fit.
PRETRAIN_SEED = 1


@pytest.mark.slow
def test_tiny_reproduce_pipeline_end_to_end(tmp_path):
    venv = Path(sys.executable).parent.parent
    demo, repro = tmp_path / "demo", tmp_path / "repro"
    command = [
        "make", "-C", str(REPO), "reproduce-demo", f"VENV={venv}", f"DEMO_DIR={demo}", f"REPRO={repro}",
        "DEMO_VIDEOS=12", "DEMO_IMAGES=24", "DEMO_IMAGES_PER_CLASS=4",
        f"REPRO_ROWS={' '.join(ROWS)}", f"REPRO_BENCHMARKS={' '.join(BENCHMARKS)}", f"REPRO_PRETRAIN_SEEDS={PRETRAIN_SEED}",
        "REPRO_PRETRAIN_ARGS=--trainer.max_epochs 1 --data.init_args.batch_size 8",
        "REPRO_EVAL_ARGS=--trainer.max_steps 2",
    ]  # fmt: skip
    environment = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]

    runs = {"random": "random", "flow_classification": f"flow_classification/pretrain_seed{PRETRAIN_SEED}"}
    pretrained = repro / "pretrain" / runs["flow_classification"]
    backbone = pretrained / "backbone.pt"
    assert backbone.is_file(), "flow_classification was not pretrained and exported"
    assert torch.load(backbone, weights_only=True)["source"]["objective"] == "flow_classification"
    assert f"seed_everything: {PRETRAIN_SEED}\n" in (pretrained / "config.yaml").read_text()
    for row in ROWS:
        for benchmark in BENCHMARKS:
            record = json.loads((repro / runs[row] / benchmark / "seed0" / "results.json").read_text())
            assert record["benchmark"] == benchmark and record["metrics"]
            assert record["backbone"] == ("random" if row == "random" else str(backbone))
    tables = (repro / "tables.md").read_text()
    for label in ("| Random |", "| Ours direct (flow classification) |"):
        assert tables.count(label) == 2, label  # a row in Table 1 and in Table 2
    assert "synthetic world" in tables

    # A rerun finds every eval done: it would only write the tables again.
    again = subprocess.run([*command, "--dry-run"], capture_output=True, text=True, env=environment, check=True)
    assert " fit " not in again.stdout and " test " not in again.stdout and " report " in again.stdout
