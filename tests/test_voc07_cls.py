"""VOC07 classification: data, augmentation, loss, trained layers, and both configs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from crossflow.cli import main as crossflow_main
from evals.voc import VOC_CLASSES, year_dir
from evals.voc07_cls import RandomScaleCrop, VOC07Classification, VOC07ClassificationData, VOCClassificationDataset, sigmoid_cross_entropy

from .conftest import REPO, SHARED_DATA

SHARED_VOC = SHARED_DATA / "voc"
needs_shared_voc = pytest.mark.skipif(not SHARED_VOC.is_dir(), reason=f"real VOC samples not found at {SHARED_VOC}")


@pytest.fixture(scope="module")
def synthetic_voc(tmp_path_factory) -> Path:
    """A small synthetic world in the VOC layout (24 images: 12 trainval, 12 test)."""
    out = tmp_path_factory.mktemp("synth") / "voc"
    assert crossflow_main(["synth", "voc", "--out", str(out), "--num-images", "24", "--seed", "3"]) == 0
    return out


def coordinate_image(height: int, width: int) -> torch.Tensor:
    """``[3, H, W]``: channel 0 = x, channel 1 = y, channel 2 = 0."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij")
    return torch.stack([xs, ys, torch.zeros_like(xs)])


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0])
def test_scale_is_the_window_side_relative_to_the_crop(scale):
    torch.manual_seed(0)
    crop = RandomScaleCrop(50, scale, scale, flip=False)(coordinate_image(300, 400))
    assert crop.shape == (3, 50, 50)
    x_span = crop[0, 0, -1] - crop[0, 0, 0]
    y_span = crop[1, -1, 0] - crop[1, 0, 0]
    assert x_span == pytest.approx(scale * 50, abs=2.5) and y_span == pytest.approx(scale * 50, abs=2.5)


def test_window_is_capped_to_fit_small_images():
    torch.manual_seed(0)
    for _ in range(10):
        crop = RandomScaleCrop(50, 0.5, 2.0, flip=False)(coordinate_image(60, 80))
        assert crop[0].min() >= 0 and crop[0].max() <= 79 and crop[1].min() >= 0 and crop[1].max() <= 59
        assert crop[1, -1, 0] - crop[1, 0, 0] <= 60  # window side <= min(H, W) = 1.2 x the crop


def test_flip_mirrors_half_of_the_time():
    torch.manual_seed(0)
    orientations = [bool(RandomScaleCrop(20, 1.0, 1.0)(coordinate_image(40, 40))[0, 0, 0] > 10) for _ in range(40)]
    assert 5 < sum(orientations) < 35  # x decreasing left to right in the mirrored ones


@needs_shared_voc
def test_labels_of_the_real_voc2007_samples():
    dataset = VOCClassificationDataset(year_dir(SHARED_VOC, "2007"), "trainval", RandomScaleCrop(224), crops=2)
    assert dataset.ids == ["000001", "000002", "000003", "000004", "000005"]
    present = {image_id: sorted(VOC_CLASSES[c] for c in np.flatnonzero(dataset.labels[i] == 1)) for i, image_id in enumerate(dataset.ids)}
    assert present == {"000001": ["dog", "person"], "000002": ["train"], "000003": ["chair", "sofa"], "000004": ["car"], "000005": ["chair"]}
    assert set(dataset.labels.unique().tolist()) == {-1, 1}  # 000005's difficult chairs come with non-difficult ones
    crops, labels = dataset[4]
    assert crops.shape == (2, 3, 224, 224) and labels.dtype == torch.int8


def test_labels_match_the_per_class_image_sets(synthetic_voc):
    voc_dir = year_dir(synthetic_voc, "2007")
    dataset = VOCClassificationDataset(voc_dir, "test", RandomScaleCrop(224))
    for c, name in enumerate(VOC_CLASSES):
        listed = dict(line.split() for line in (voc_dir / "ImageSets" / "Main" / f"{name}_test.txt").read_text().splitlines())
        assert [int(listed[i]) for i in dataset.ids] == dataset.labels[:, c].tolist()
    image, _ = dataset[0]
    assert image.shape == (3, 224, 224)


def test_missing_dataset_names_layout_archives_and_demo(tmp_path):
    data = VOC07ClassificationData(root=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"VOCdevkit/VOC2007/JPEGImages.*VOCtrainval_06-Nov-2007.tar.*crossflow synth voc"):
        data.setup("fit")


def test_loss_is_summed_binary_cross_entropy_over_non_difficult_labels_per_image():
    torch.manual_seed(0)
    logits = torch.randn(3, 20, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(-1, 2, (3, 20))
    p = 1 / (1 + np.exp(-logits.detach().numpy()))
    terms = np.where(labels.numpy() == 1, -np.log(p), -np.log(1 - p))
    expected = terms[labels.numpy() != 0].sum() / 3
    loss = sigmoid_cross_entropy(logits, labels)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    assert (logits.grad[labels == 0] == 0).all() and (logits.grad[labels != 0] != 0).all()


@pytest.mark.parametrize(
    ("train_layers", "trained"),
    [("all", {"conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"}), ("fc6-8", {"fc6", "fc7"}), ("new", set())],
)
def test_train_layers_choose_the_optimised_parameters(train_layers, trained):
    model = VOC07Classification(train_layers=train_layers)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    expected = {f"network.layers.{layer}.conv.{kind}" for layer in trained for kind in ("weight", "bias")}
    assert trainable == expected | {"classifier.weight", "classifier.bias"}
    optimizer = model.configure_optimizers()["optimizer"]
    weights, biases = optimizer.param_groups
    assert sum(len(g["params"]) for g in (weights, biases)) == len(trainable)
    assert (weights["lr"], biases["lr"], weights["weight_decay"]) == (1e-3, 2e-3, 1e-6)


def test_forward_needs_224_inputs_and_dropout_acts_only_in_training():
    model = VOC07Classification().eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert model(images).shape == (2, 20)
        torch.testing.assert_close(model(images), model(images))
        model.train()
        assert not torch.equal(model(images), model(images))
        with pytest.raises(ValueError, match="crop_size 224"):
            model(torch.randn(1, 3, 128, 128))


def run_fit_and_test(config: Path, workdir: Path, overrides: list[str], monkeypatch) -> dict:
    """``crossflow fit`` then ``crossflow test --ckpt_path last`` with ``config`` from ``workdir``; the results.json."""
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("WANDB_SILENT", "true")
    name = config.stem
    assert crossflow_main(["fit", "--config", str(config), *overrides]) == 0
    checkpoint = workdir / "runs" / "eval" / name / "checkpoints" / "last.ckpt"
    assert crossflow_main(["test", "--config", str(config), *overrides, "--ckpt_path", str(checkpoint)]) == 0
    return json.loads((workdir / "runs" / "eval" / name / "results.json").read_text())


def assert_voc_results(results: dict) -> None:
    ap = results["per_class"]["AP"]
    assert list(ap) == list(VOC_CLASSES) and all(0 <= v <= 1 for v in ap.values())
    assert results["metrics"]["mAP"] == pytest.approx(np.mean(list(ap.values())))
    assert results["benchmark"] == "voc07_cls" and results["backbone"] == "random"


@pytest.mark.slow
def test_demo_config_end_to_end(synthetic_voc, tmp_path, monkeypatch):
    overrides = [
        "--data.init_args.root", str(synthetic_voc), "--trainer.max_steps", "2", "--data.init_args.batch_size", "4",
        "--data.init_args.test_crops", "2", "--data.init_args.num_workers", "0",
    ]
    assert_voc_results(run_fit_and_test(REPO / "configs" / "eval" / "demo_voc07_cls.yaml", tmp_path, overrides, monkeypatch))


@needs_shared_voc
@pytest.mark.slow
def test_paper_config_end_to_end_on_the_real_samples(tmp_path, monkeypatch):
    overrides = [
        "--data.init_args.root", str(SHARED_VOC), "--trainer.max_steps", "1", "--data.init_args.batch_size", "2",
        "--data.init_args.test_crops", "1", "--data.init_args.num_workers", "0",
    ]
    with pytest.warns(UserWarning, match="no positive"):  # 5 images do not cover the 20 classes
        results = run_fit_and_test(REPO / "configs" / "eval" / "voc07_cls.yaml", tmp_path, overrides, monkeypatch)
    assert_voc_results(results)
    assert results["config"]["model"]["train_layers"] == "all" and results["config"]["data"]["test_split"] == "test"
