"""Shared fixtures: the real test data in ../shared/data, and tiny prepared pairs from the synthetic world."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from crossflow.cli import main as crossflow

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
requires_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"real test data not found at {SHARED_DATA} (present in CI, absent in a user's clone)"
)


@pytest.fixture(autouse=True)
def garbage_collected_after_each_test():
    """Collect reference cycles after each test (and after the other fixtures' teardown), freeing the tensors they hold.

    A Lightning Trainer and its module refer to each other, so a finished fit lives on until Python's rare full
    collection: without this, a test worker grew by every fit it ran (7.7 GB after tests/test_backbones.py,
    test_configs.py and test_supervised.py in one process, 1.6 GB with it) and the OOM killer took one (CI of
    2026-12-03, reproduced on a fresh clone)."""
    yield
    gc.collect()


@pytest.fixture(autouse=True)
def no_wandb_run_left_open():
    """Finish any W&B run a test leaves open: a WandbLogger would otherwise reuse it and write elsewhere."""
    yield
    import wandb

    if wandb.run is not None:
        wandb.finish()


@pytest.fixture(scope="session")
def tiny_videos(tmp_path_factory) -> Path:
    """Six short synthetic clips written as real video files."""
    out = tmp_path_factory.mktemp("synth") / "videos"
    assert crossflow(["synth", "videos", "--out", str(out), "--num-videos", "6", "--frames", "10", "--width", "96", "--height", "72", "--seed", "3", "--workers", "1"]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_pairs(tiny_videos, tmp_path_factory) -> Path:
    """Those clips through the real `crossflow prepare`: train and val shards."""
    out = tmp_path_factory.mktemp("pairs")
    status = crossflow(["prepare", str(tiny_videos), "--out", str(out), "--frames-per-video", "3", "--gap", "2",
                        "--short-side", "72", "--val-fraction", "0.3", "--workers", "1", "--seed", "0"])
    assert status == 0
    return out
