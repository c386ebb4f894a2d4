"""The supervised reference: a tiny fit of configs/pretrain/supervised_demo.yaml, its export, its table row, and its
labelled set apart from the evals' images."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crossflow.checkpoints import load_checkpoint
from crossflow.cli import main as crossflow
from crossflow.errors import InvalidInputError
from crossflow.models import load_backbone
from crossflow.models.alexnet import LAYERS
from crossflow.models.backbone import read_backbone_file
from crossflow.report import ROWS, row_of
from crossflow.supervised import SupervisedPretraining, supervised_from_checkpoint
from evals.common import backbone_identity

from .conftest import REPO

CONFIG = REPO / "configs" / "pretrain" / "supervised_demo.yaml"


def synth_imagenet(out: Path, seed: int, per_class: int = 2) -> Path:
    assert crossflow(["synth", "imagenet", "--out", str(out), "--images-per-class", str(per_class), "--val-per-class", "1",
                      "--seed", str(seed), "--workers", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def supervised_run(tmp_path_factory) -> Path:
    """A 3-step fit of the demo config (batch 4, one validation at the end of its one epoch) on a tiny labelled set."""
    folder = tmp_path_factory.mktemp("supervised")
    data = synth_imagenet(folder / "imagenet_supervised", seed=3)
    args = [
        "fit", "--config", str(CONFIG), "--data.init_args.root", str(data), "--data.init_args.batch_size", "4",
        "--data.init_args.val_batch_size", "10", "--trainer.accelerator", "cpu", "--trainer.max_steps", "3",
        "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(folder / "run"),
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.init_args.save_dir", str(folder / "csv"),
    ]  # fmt: skip
    assert crossflow(args) == 0
    assert crossflow(["export", str(folder / "run" / "checkpoints" / "best.ckpt"), str(folder / "backbone.pt")]) == 0
    return folder


def test_export_folds_the_trained_network_and_every_layer_was_trained(supervised_run):
    checkpoint = load_checkpoint(supervised_run / "run" / "checkpoints" / "best.ckpt")  # weights_only=True: plain hparams
    trained = supervised_from_checkpoint(checkpoint).backbone.eval()
    assert checkpoint["state_dict"]["backbone.layers.conv1.bn.num_batches_tracked"] == 3
    kind, record = read_backbone_file(supervised_run / "backbone.pt")
    assert kind == "crossflow" and record["source"]["objective"] == "supervised"
    assert record["source"]["data"] == str(supervised_run / "imagenet_supervised")  # which labelled set trained it
    assert record["untrained_layers"] == []  # fc6/fc7 ran at the 193 px crops: nothing left at its random init
    exported = load_backbone(supervised_run / "backbone.pt")
    images = torch.randn(2, 3, 200, 200)
    with torch.no_grad():
        expected, folded = trained(images, LAYERS), exported(images, LAYERS)
    for layer in LAYERS:
        torch.testing.assert_close(folded[layer], expected[layer], rtol=1e-4, atol=1e-4 * float(expected[layer].abs().max()))


def test_backbone_is_the_supervised_row_of_the_tables(supervised_run):
    record = backbone_identity(str(supervised_run / "backbone.pt"))  # what every eval writes into results.json
    assert row_of(record) == "supervised"
    assert ROWS["supervised"] == ("Supervised (synthetic labels)", "Class Labels") and next(iter(ROWS)) == "supervised"


def test_a_few_steps_on_one_batch_fit_its_labels(supervised_run):
    torch.manual_seed(0)
    images = torch.stack([
        torch.from_numpy(np.asarray(Image.open(path).convert("RGB").resize((193, 193)), dtype=np.float32) / 255).permute(2, 0, 1)
        for path in sorted((supervised_run / "imagenet_supervised" / "val").glob("*/*.JPEG"))[:6]
    ])  # fmt: skip
    labels = torch.arange(6)  # one image of each of six classes
    model = SupervisedPretraining(num_classes=6, dropout=0.0, lr=0.01)
    optimizer = model.configure_optimizers()["optimizer"]
    losses = []
    for _ in range(6):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_inputs_too_small_for_fc7_are_one_line_errors():
    with pytest.raises(InvalidInputError, match="crop_size >= 193"):
        SupervisedPretraining()(torch.zeros(1, 3, 192, 224))


def test_labelled_set_is_rendered_apart_from_the_eval_images(tmp_path):
    dry_run = subprocess.run(
        ["make", "-n", "-C", str(REPO), f"VENV={Path(sys.executable).parent.parent}", f"DEMO_DIR={tmp_path}",
         f"{tmp_path}/imagenet_supervised/synth.json", f"{tmp_path}/imagenet/synth.json", f"{tmp_path}/voc/synth.json"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    seeds = {line.split("--out ")[1].split()[0]: line.split("--seed ")[1].split()[0] for line in dry_run.splitlines() if " synth " in line}
    assert seeds == {f"{tmp_path}/imagenet_supervised": "3", f"{tmp_path}/imagenet": "2", f"{tmp_path}/voc": "1"}
    labelled, evaluated = synth_imagenet(tmp_path / "seed3", 3, per_class=1), synth_imagenet(tmp_path / "seed2", 2, per_class=1)
    labelled_images = sorted(labelled.rglob("*.JPEG"))
    assert len(labelled_images) == 40  # 20 classes, 1 train + 1 val each
    eval_pixels = [np.asarray(Image.open(path)) for path in sorted(evaluated.rglob("*.JPEG"))]
    for path in labelled_images:
        pixels = np.asarray(Image.open(path))
        assert not any(pixels.shape == other.shape and np.array_equal(pixels, other) for other in eval_pixels), path
