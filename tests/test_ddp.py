"""DDP on CPU (gloo): a step of 2 processes equals a step of 1 process over the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch

from crossflow.module import CrossFlowPretraining

SCRIPT = Path(__file__).with_name("ddp_step.py")


def run_step(pairs: Path, out: Path, devices: int) -> dict:
    launcher = [sys.executable] if devices == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(devices), "--master_port", "29533"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCRIPT.parents[1])}
    result = subprocess.run([*launcher, str(SCRIPT), str(pairs), str(out), str(devices)], env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out)


def test_two_process_step_equals_one_process_step(tiny_pairs, tmp_path):
    single = run_step(tiny_pairs, tmp_path / "single.pt", 1)
    distributed = run_step(tiny_pairs, tmp_path / "ddp.pt", 2)
    for name, value in single.items():
        torch.testing.assert_close(distributed[name], value, rtol=1e-4, atol=1e-6, msg=name)
    L.seed_everything(0)
    untouched = CrossFlowPretraining(taps=["conv1", "pool1", "conv3", "pool5"], hidden_dim=32)
    moved = [name for name, value in untouched.named_parameters() if value.requires_grad and not torch.equal(value, single[name])]
    assert len(moved) > 5  # the step changed the weights: this compares two trained copies
