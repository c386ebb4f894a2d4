"""ImageNet linear probing: probe features, frozen backbone, class order, folder errors, demo config end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from crossflow.cli import main as crossflow_main
from crossflow.models import AlexNet
from evals.linear_probe import PROBE_TAPS, ImageNetData, LabelledImageFolder, LinearProbe, probe_dims, probe_features, probe_sizes

from .conftest import REPO, SHARED_DATA

SHARED_IMAGENET = SHARED_DATA / "imagenet"
needs_shared_imagenet = pytest.mark.skipif(not SHARED_IMAGENET.is_dir(), reason=f"real ImageNet samples not found at {SHARED_IMAGENET}")


@pytest.fixture(scope="module")
def synthetic_imagenet(tmp_path_factory) -> Path:
    """The synthetic world in ImageFolder layout: 20 classes, 3 train + 2 val images each."""
    out = tmp_path_factory.mktemp("synth") / "imagenet"
    assert crossflow_main(["synth", "imagenet", "--out", str(out), "--images-per-class", "3", "--val-per-class", "2"]) == 0
    return out


@pytest.fixture(scope="module")
def real_sample_root(tmp_path_factory) -> Path:
    """train/ and val/ made of the real sample class folders (links), val without its last class."""
    root = tmp_path_factory.mktemp("imagenet")
    wnids = sorted(entry.name for entry in os.scandir(SHARED_IMAGENET) if entry.is_dir())
    for split, members in (("train", wnids), ("val", wnids[:-1])):
        (root / split).mkdir()
        for wnid in members:
            (root / split / wnid).symlink_to(SHARED_IMAGENET / wnid, target_is_directory=True)
    return root


def test_probe_feature_sizes_at_224_and_smaller_inputs():
    channels = AlexNet().channels
    assert probe_sizes(channels) == {"conv1": 10, "conv2": 6, "conv3": 5, "conv4": 5, "conv5": 6}  # Zhang et al.'s
    assert probe_dims(channels) == {"conv1": 9600, "conv2": 9216, "conv3": 9600, "conv4": 9600, "conv5": 9216}
    model = LinearProbe(num_classes=7)
    for size in (224, 128):
        with torch.no_grad():
            features = probe_features(model.backbone(torch.randn(2, 3, size, size), taps=PROBE_TAPS), model.probe_sizes)
            logits = model(torch.randn(2, 3, size, size))
        assert {tap: f.shape for tap, f in features.items()} == {tap: (2, dim) for tap, dim in probe_dims(channels).items()}
        assert {tap: l.shape for tap, l in logits.items()} == {tap: (2, 7) for tap in PROBE_TAPS}


def test_probe_resize_is_bilinear_sampling_at_pixel_centres():
    # a linear ramp stays linear: output j samples input coordinate (j + 0.5) * in / out - 0.5
    ramp = torch.arange(56, dtype=torch.float32).expand(1, 96, 56, 56)
    activations = {tap: ramp for tap in PROBE_TAPS}
    conv1 = probe_features(activations, probe_sizes(AlexNet().channels))["conv1"].view(96, 10, 10)
    expected = (torch.arange(10) + 0.5) * 5.6 - 0.5
    torch.testing.assert_close(conv1[0, 3], expected)
    torch.testing.assert_close(conv1[5, :, 7], torch.full((10,), float(expected[7])))


def random_batches(num_classes: int, count: int) -> DataLoader:
    torch.manual_seed(0)
    data = [(torch.randn(3, 128, 128), int(torch.randint(num_classes, ()))) for _ in range(count)]
    return DataLoader(data, batch_size=4)


def test_frozen_backbone_does_not_change_and_stays_in_eval_mode(tmp_path):
    model = LinearProbe(num_classes=5, lr=0.1)
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    heads_before = {k: v.clone() for k, v in model.heads.state_dict().items()}
    model.train()
    assert not model.backbone.training and model.heads.training
    assert not any(p.requires_grad for p in model.backbone.parameters())
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(model, train_dataloaders=random_batches(5, 12))
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[key]), key
    changed = [k for k, v in model.heads.state_dict().items() if not torch.equal(v, heads_before[k])]
    assert any(k.endswith("1.weight") for k in changed) and any(k.endswith("running_mean") for k in changed)


def test_optimiser_holds_only_the_heads():
    model = LinearProbe(num_classes=5)
    optimizer = model.configure_optimizers()["optimizer"]
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in model.heads.parameters()}
    assert optimizer.defaults["lr"] == 0.01 and optimizer.defaults["weight_decay"] == 5e-4 and optimizer.defaults["momentum"] == 0.9


@needs_shared_imagenet
def test_class_indices_follow_the_standard_sorted_wnid_order(real_sample_root):
    standard = [line.split()[1] for line in (SHARED_IMAGENET / "synsets_index_1000.txt").read_text().splitlines()]
    assert standard == sorted(standard)  # so ImageFolder's sorted folders on full ImageNet give the standard indices
    data = ImageNetData(root=str(real_sample_root), crop_size=224, resize_size=256)
    assert data.classes == sorted(data.classes) and data.num_classes == 6
    positions = [standard.index(wnid) for wnid in data.classes]
    assert positions == sorted(positions) and standard.index("n01440764") == 0
    data.setup("fit")
    for path, target in data.train_set.samples + data.val_set.samples:
        assert Path(path).name.startswith(data.classes[target])
    image, target = data.val_set[0]
    assert image.shape == (3, 224, 224) and target == 0  # tench


@needs_shared_imagenet
def test_val_with_fewer_classes_keeps_train_indices(real_sample_root):
    data = ImageNetData(root=str(real_sample_root))
    data.setup("test")
    val_targets = sorted({target for _, target in data.val_set.samples})
    assert val_targets == [0, 1, 2, 3, 4]  # the sixth class folder is absent from val
    with pytest.raises(ValueError, match="absent from the training classes"):
        LabelledImageFolder(real_sample_root / "train", data.classes[:3])


def test_flat_val_folder_explains_how_to_sort_it(tmp_path):
    (tmp_path / "train" / "n01440764").mkdir(parents=True)
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"")
    with pytest.raises(ValueError, match=r"flat ILSVRC2012 validation images.*devkit.*torchvision.datasets.ImageNet"):
        ImageNetData(root=str(tmp_path)).setup("test")


def test_missing_dataset_names_layout_archives_and_demo(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere/train/<wnid>.*ILSVRC2012_img_train.tar.*crossflow synth imagenet"):
        ImageNetData(root=str(tmp_path / "nowhere")).setup("fit")


def test_class_count_mismatch_is_an_error(synthetic_imagenet, tmp_path):
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="the data has 20 classes but model.num_classes is 1000"):
        trainer.fit(LinearProbe(num_classes=1000), datamodule=ImageNetData(root=str(synthetic_imagenet), num_workers=0))


@pytest.mark.slow
def test_demo_config_end_to_end(synthetic_imagenet, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = str(REPO / "configs" / "eval" / "demo_in1k_linear.yaml")
    overrides = ["--data.init_args.root", str(synthetic_imagenet), "--trainer.max_steps", "3", "--data.init_args.num_workers", "0",
                 "--data.init_args.batch_size", "16"]
    assert crossflow_main(["fit", "--config", config, *overrides]) == 0
    checkpoint = tmp_path / "runs" / "eval" / "demo_in1k_linear" / "checkpoints" / "last.ckpt"
    assert crossflow_main(["test", "--config", config, *overrides, "--ckpt_path", str(checkpoint)]) == 0
    results = json.loads((tmp_path / "runs" / "eval" / "demo_in1k_linear" / "results.json").read_text())
    assert results["benchmark"] == "in1k_linear" and set(results["metrics"]) == {f"top1_{tap}" for tap in PROBE_TAPS}
    assert all(0 <= value <= 1 for value in results["metrics"].values())
    assert results["config"]["model"]["num_classes"] == 20


def test_train_per_class_keeps_the_first_images_of_each_class_and_all_of_val(synthetic_imagenet):
    data = ImageNetData(root=str(synthetic_imagenet), num_workers=0, train_per_class=2)
    data.setup("fit")
    names = sorted(entry.name for entry in os.scandir(synthetic_imagenet / "train"))
    expected = [(str(synthetic_imagenet / "train" / name / f"{name}_{i:05d}.JPEG"), label) for label, name in enumerate(names) for i in range(2)]
    assert data.train_set.samples == expected and data.train_set.targets == [label for _, label in expected]
    assert len(data.train_set) == 40 and len(data.val_set) == 40  # 20 classes x 2 of 3 train images; val untouched
    with pytest.raises(ValueError, match="train_per_class must be at least 1"):
        ImageNetData(root=str(synthetic_imagenet), num_workers=0, train_per_class=0).setup("fit")
