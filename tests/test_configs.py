"""Every eval YAML under configs/eval runs `crossflow fit` (fast_dev_run) on a tiny synthetic world.

(The pretraining YAMLs run in tests/test_pretraining.py, on tiny prepared pairs.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from crossflow.cli import main as crossflow

from .conftest import REPO

EVAL_CONFIGS = sorted((REPO / "configs" / "eval").glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("world")
    assert crossflow(["synth", "voc", "--out", str(root / "voc"), "--num-images", "12", "--seed", "5", "--workers", "1"]) == 0
    assert crossflow(["synth", "imagenet", "--out", str(root / "imagenet"), "--images-per-class", "2", "--val-per-class", "1", "--seed", "5", "--workers", "1"]) == 0
    return {"voc": root / "voc", "imagenet": root / "imagenet"}


def test_every_config_folder_is_covered():
    assert {p.stem.removeprefix("demo_") for p in EVAL_CONFIGS} == {"voc07_cls", "voc07_det", "voc12_seg", "in1k_linear"}


@pytest.mark.parametrize("config", EVAL_CONFIGS, ids=lambda p: p.stem)
def test_every_eval_config_runs_fit(config, tiny_world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tiny_world["imagenet" if "linear" in config.stem else "voc"]
    args = ["fit", "--config", str(config), "--data.init_args.root", str(root), "--trainer.fast_dev_run", "1",
            "--trainer.accelerator", "cpu", "--data.init_args.num_workers", "0"]
    if "linear" in config.stem:
        args += ["--model.init_args.num_classes", "20"]
    if config.stem == "voc12_seg":  # the protocol's train_aug needs SBD, which the synthetic world does not have
        args += ["--data.init_args.sbd_root", "null", "--data.init_args.train_split", "train"]
    assert crossflow(args) == 0
