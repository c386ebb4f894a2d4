"""Pretraining through the `crossflow` CLI on tiny prepared pairs: configs, reproducibility,
export with BN folding, the run summary, and the errors a user meets."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from crossflow.cli import main as crossflow
from crossflow.export import load_pretraining_checkpoint
from crossflow.models import load_backbone
from crossflow.module import CrossFlowPretraining

from .conftest import REPO
from .test_pairs import pairs_with_failures

# The flow pretraining configs (supervised_demo.yaml trains on labelled images: tests/test_supervised.py).
PRETRAIN_CONFIGS = sorted(p for p in (REPO / "configs" / "pretrain").glob("*.yaml") if "crossflow.data.pairs.PairDataModule" in p.read_text())
SMALL = ["--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0", "--trainer.accelerator", "cpu"]


@pytest.mark.parametrize("config", PRETRAIN_CONFIGS, ids=lambda p: p.stem)
def test_every_pretrain_config_runs_fit(config, tiny_pairs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(config), "--data.init_args.data_dir", str(tiny_pairs), "--trainer.fast_dev_run", "1", *SMALL]
    assert crossflow(args) == 0


def csv_run(tiny_pairs: Path, root: Path, *extra: str) -> Path:
    """A short demo-config fit with the CSV logger instead of W&B (one override away); returns the run folder."""
    args = [
        "fit", "--config", str(REPO / "configs" / "pretrain" / "demo.yaml"), "--data.init_args.data_dir", str(tiny_pairs),
        "--data.init_args.crop_size", "64", "--data.init_args.num_points", "32", "--data.init_args.batch_size", "4",
        "--data.init_args.num_workers", "0", "--trainer.accelerator", "cpu", "--trainer.max_steps", "4",
        "--trainer.check_val_every_n_epoch", "1", "--trainer.log_every_n_steps", "1",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.init_args.save_dir", str(root), *extra,
    ]
    assert crossflow(args) == 0
    return root


def logged_losses(root: Path) -> list[float]:
    rows = csv.DictReader(open(next(root.rglob("metrics.csv"))))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


@pytest.fixture(scope="module")
def demo_run(tiny_pairs, tmp_path_factory) -> Path:
    """A finished tiny run of the demo config (its checkpoints live under runs/pretrain/demo of this folder)."""
    folder = tmp_path_factory.mktemp("demo_run")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        csv_run(tiny_pairs, folder / "csv")
    return folder


def test_same_seed_and_data_give_the_same_losses(demo_run, tiny_pairs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, again = logged_losses(demo_run / "csv"), logged_losses(csv_run(tiny_pairs, tmp_path / "csv"))
    assert len(first) >= 3 and first == again
    other_seed = logged_losses(csv_run(tiny_pairs, tmp_path / "csv_seed1", "--seed_everything", "1"))
    assert other_seed != first


def test_augmenting_on_the_device_trains_like_the_cpu_path(demo_run, tiny_pairs, tmp_path, monkeypatch):
    """Lightning calls the DataModule's on_after_batch_transfer, and the warped batches train the same run."""
    monkeypatch.chdir(tmp_path)
    on_device = logged_losses(csv_run(tiny_pairs, tmp_path / "csv", "--data.init_args.augment_on_device", "true"))
    cpu = logged_losses(demo_run / "csv")
    assert len(on_device) == len(cpu) and on_device != cpu and np.allclose(on_device, cpu, rtol=2e-4)  # warps half a grey level apart


def test_undecodable_samples_are_counted_per_epoch_in_training_and_validation(tiny_pairs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pairs = pairs_with_failures(tiny_pairs, tmp_path / "pairs", splits=("train", "val"))  # 1 good, 2 bad samples
    with pytest.warns(UserWarning, match="skipping undecodable sample"):
        root = csv_run(pairs, tmp_path / "csv", "--data.init_args.batch_size", "3", "--trainer.max_steps", "2")
    rows = list(csv.DictReader(open(next(root.rglob("metrics.csv")))))
    train = [float(r["train/skipped_samples"]) for r in rows if r.get("train/skipped_samples")]
    val = [float(r["val/skipped_samples"]) for r in rows if r.get("val/skipped_samples")]
    assert train == [2.0, 2.0] and val == [2.0, 2.0]  # one batch an epoch, two epochs; validation after each
    assert logged_losses(root)  # the good sample still trained


def test_run_writes_initial_best_and_last_checkpoints(demo_run):
    checkpoints = demo_run / "runs" / "pretrain" / "demo" / "checkpoints"
    assert {p.name for p in checkpoints.glob("*.ckpt")} == {"init.ckpt", "best.ckpt", "last.ckpt"}
    initial = torch.load(checkpoints / "init.ckpt", weights_only=False)
    assert initial["global_step"] == 0


def test_export_folds_batch_norm_and_matches_the_training_backbone(demo_run, tmp_path):
    checkpoint = demo_run / "runs" / "pretrain" / "demo" / "checkpoints" / "last.ckpt"
    assert crossflow(["export", str(checkpoint), str(tmp_path / "backbone.pt")]) == 0
    exported, trained = load_backbone(tmp_path / "backbone.pt"), load_pretraining_checkpoint(checkpoint).backbone
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in exported.modules())
    image = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected, actual = trained(image, ["conv5", "fc7"]), exported(image, ["conv5", "fc7"])
    for layer in expected:
        assert (actual[layer] - expected[layer]).abs().max() <= 1e-4 * expected[layer].abs().max()
    settings = torch.load(tmp_path / "backbone.pt", weights_only=True)["source"]["settings"]  # what report rows are keyed by
    assert settings["model"]["lr"] == 1e-4 and settings["model"]["taps"] == ["conv1", "pool1", "conv3", "pool5"]
    assert settings["data"]["crop_size"] > 0 and not {"seed", "data_dir", "num_workers"} & set(settings["data"])


def test_export_refuses_what_is_not_a_crossflow_checkpoint(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    torch.save({"state_dict": {"weight": torch.zeros(1)}}, tmp_path / "other.ckpt")
    for path in (tmp_path / "notes.txt", tmp_path / "other.ckpt", tmp_path / "missing.ckpt"):
        assert crossflow(["export", str(path), str(tmp_path / "out.pt")]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("crossflow export: error:") and "\n" not in error
    assert not (tmp_path / "out.pt").exists()


def test_summary_reports_losses_sigma_and_grouping_auc(demo_run, capsys):
    run_dir = demo_run / "runs" / "pretrain" / "demo"
    assert crossflow(["export", str(run_dir / "checkpoints" / "best.ckpt"), str(run_dir / "backbone.pt")]) == 0
    assert crossflow(["summary", str(run_dir)]) == 0
    printed = capsys.readouterr().out
    for line in ("val loss", "minus H(S_f)", "sigma^2", "grouping AUC", "backbone"):
        assert line in printed
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0.0 <= summary["grouping_auc"]["initial"] <= 1.0 and 0.0 <= summary["grouping_auc"]["trained"] <= 1.0
    (loss0, excess0), (loss1, excess1) = summary["val_loss"]["initial"], summary["val_loss"]["trained"]
    assert excess0 >= 0 and excess1 >= 0 and loss0 > excess0 and loss1 > excess1


def test_missing_data_folder_is_one_line_naming_the_command(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = str(REPO / "configs" / "pretrain" / "demo.yaml")
    assert crossflow(["fit", "--config", config, "--data.init_args.data_dir", str(tmp_path / "nowhere"), *SMALL]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(tmp_path / "nowhere") in error and "crossflow prepare" in error


def test_mistyped_config_key_is_a_parser_error(capsys):
    config = str(REPO / "configs" / "pretrain" / "demo.yaml")
    with pytest.raises(SystemExit) as exit_info:
        crossflow(["fit", "--config", config, "--model.init_args.hiden_dim", "8"])
    assert exit_info.value.code != 0
    assert "hiden_dim" in capsys.readouterr().err


def test_non_finite_loss_stops_naming_the_samples():
    module = CrossFlowPretraining(taps=["conv1", "pool1"], hidden_dim=8)
    batch = {
        "image": torch.full((2, 3, 64, 64), float("nan")),
        "points": torch.rand(2, 16, 2) * 63,
        "flow": torch.rand(2, 16, 2) * 2 - 1,
        "key": ["video_a_000003", "video_b_000007"],
    }
    with pytest.raises(FloatingPointError, match="video_a_000003.*video_b_000007"):
        module.training_step(batch, 0)


def test_flow_classification_head_has_two_by_k_logits():
    module = CrossFlowPretraining(objective="flow_classification", taps=["conv1", "pool1"], hidden_dim=8, num_bins=16)
    output = module(torch.randn(2, 3, 64, 64), torch.rand(2, 5, 2) * 63)
    assert output.shape == (2, 5, 2, 16) and not module.log_sigma2.requires_grad
