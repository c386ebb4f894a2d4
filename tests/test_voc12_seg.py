"""VOC12 hypercolumn segmentation: label reading (real VOC mask, SBD .mat), train_aug, augmentation,
mean IU against hand-worked confusion matrices, dense = sparse inference, the two stages, and the demo config."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import scipy.io
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassJaccardIndex

from crossflow.cli import main as crossflow_main
from crossflow.data.synthetic import PALETTE
from crossflow.models import AlexNet, save_backbone
from evals.voc12_seg import (
    NUM_CLASSES, SEG_CLASSES, VOC12SegDataModule, VOC12Segmentation, intersection_over_union, mean_iu,
    random_scale_crop_flip, read_label, read_label_png, read_sbd_mask, sample_labelled_pixels,
    sampled_pixel_loss, stage_learning_rates, train_aug_samples,
)
from evals.voc import read_image_set, year_dir
from tests.conftest import REPO, SHARED_DATA, requires_shared_data

REAL_VOC12 = SHARED_DATA / "voc" / "VOCdevkit" / "VOC2012"
REAL_ID = "2007_000033"


def write_palette_png(path: Path, labels: np.ndarray) -> None:
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette(PALETTE)
    image.save(path)


def write_sbd_mat(path: Path, labels: np.ndarray) -> None:
    """SBD's cls/<id>.mat layout: a struct GTcls with fields Boundaries, Segmentation, CategoriesPresent."""
    present = np.unique(labels[(labels > 0) & (labels < 255)]).astype(np.uint8)
    record = {"Boundaries": np.zeros((20, 1), dtype=object), "Segmentation": labels.astype(np.uint8), "CategoriesPresent": present}
    scipy.io.savemat(path, {"GTcls": record})


def voc12_layout(root: Path, labels: dict[str, np.ndarray], splits: dict[str, list[str]]) -> Path:
    """A VOCdevkit/VOC2012 folder with random JPEGs, palette label PNGs and ImageSets/Segmentation lists."""
    base = root / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for image_id, mask in labels.items():
        Image.fromarray(rng.integers(0, 256, (*mask.shape, 3), dtype=np.uint8)).save(base / "JPEGImages" / f"{image_id}.jpg")
        write_palette_png(base / "SegmentationClass" / f"{image_id}.png", mask)
    for split, ids in splits.items():
        (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return base


# ------------------------------------------------------------------------------------------------ labels
@requires_shared_data
def test_real_voc2012_palette_mask_reads_class_indices():
    mask = read_label_png(REAL_VOC12 / "SegmentationClass" / f"{REAL_ID}.png")
    values, counts = np.unique(mask, return_counts=True)
    assert mask.shape == (366, 500) and mask.dtype == np.uint8
    assert values.tolist() == [0, 1, 255]  # background, aeroplane, void border
    assert counts.tolist() == [143868, 30937, 8195]


@requires_shared_data
def test_real_voc2012_sample_through_the_eval_loader(tmp_path):
    """The real image and its mask, paired at full resolution by the DataModule's evaluation set."""
    base = tmp_path / "VOCdevkit" / "VOC2012"
    shutil.copytree(REAL_VOC12, base)
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text(f"{REAL_ID}\n")
    data = VOC12SegDataModule(str(tmp_path), train_split="val", num_workers=0)
    data.setup("test")
    image, mask = data.eval_set[0]
    assert image.shape == (3, 366, 500) and mask.shape == (366, 500) and mask.dtype == torch.long
    assert set(mask.unique().tolist()) == {0, 1, 255}
    # the aeroplane pixels are the sky-contrasting object: the image differs between the classes
    assert not torch.allclose(image[:, mask == 0].mean(1), image[:, mask == 1].mean(1), atol=0.1)


def test_grayscale_segmentation_class_aug_png(tmp_path):
    labels = np.array([[0, 15, 255], [20, 1, 0]], dtype=np.uint8)
    Image.fromarray(labels, mode="L").save(tmp_path / "aug.png")
    np.testing.assert_array_equal(read_label_png(tmp_path / "aug.png"), labels)
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="palette"):
        read_label_png(tmp_path / "rgb.png")


def test_sbd_mat_segmentation(tmp_path):
    labels = np.random.default_rng(1).integers(0, 21, (7, 9)).astype(np.uint8)
    write_sbd_mat(tmp_path / "2008_000002.mat", labels)
    np.testing.assert_array_equal(read_sbd_mask(tmp_path / "2008_000002.mat"), labels)
    np.testing.assert_array_equal(read_label(tmp_path / "2008_000002.mat"), labels)


# ------------------------------------------------------------------------------------------------ train_aug
def train_aug_world(tmp_path: Path) -> tuple[Path, Path]:
    """VOC train {a, b}, val {c, d}; SBD train {b, c, e}, val {f}: train_aug = {a, b, e, f}."""
    masks = {i: np.full((4, 5), k, np.uint8) for k, i in enumerate("abcdef", start=1)}
    voc_dir = voc12_layout(tmp_path / "voc", masks, {"train": ["a", "b"], "val": ["c", "d"]})
    sbd = tmp_path / "benchmark_RELEASE" / "dataset"
    (sbd / "cls").mkdir(parents=True)
    for image_id in "bcef":
        write_sbd_mat(sbd / "cls" / f"{image_id}.mat", np.full((4, 5), 10 + "abcdef".index(image_id), np.uint8))
    (sbd / "train.txt").write_text("b\nc\ne\n")
    (sbd / "val.txt").write_text("f\n")
    return voc_dir, sbd


def test_train_aug_is_voc_train_and_sbd_minus_voc_val(tmp_path):
    voc_dir, sbd = train_aug_world(tmp_path)
    samples = train_aug_samples(voc_dir, str(sbd.parent), None)  # benchmark_RELEASE is accepted too
    assert [image.stem for image, _ in samples] == ["a", "b", "e", "f"]
    labels = [int(read_label(label)[0, 0]) for _, label in samples]
    assert labels == [1, 2, 14, 15]  # VOC's own PNG where there is one (a, b), else SBD's .mat (e, f)


def test_train_aug_from_pre_converted_pngs(tmp_path):
    voc_dir, _ = train_aug_world(tmp_path)
    aug = tmp_path / "SegmentationClassAug"
    aug.mkdir()
    for image_id in "abcde":
        Image.fromarray(np.full((4, 5), 7, np.uint8), mode="L").save(aug / f"{image_id}.png")
    samples = train_aug_samples(voc_dir, None, str(aug))
    assert [(image.stem, label.parent.name) for image, label in samples] == [(i, "SegmentationClassAug") for i in "abe"]
    (aug / "a.png").unlink()
    with pytest.raises(FileNotFoundError, match="a.png"):
        train_aug_samples(voc_dir, None, str(aug))


def test_train_aug_without_sbd_is_an_error_naming_where_to_get_it(tmp_path):
    voc_dir, _ = train_aug_world(tmp_path)
    with pytest.raises(ValueError, match="benchmark.tgz.*SegmentationClassAug.*train_split train"):
        train_aug_samples(voc_dir, None, None)
    with pytest.raises(FileNotFoundError, match="SBD not found"):
        train_aug_samples(voc_dir, str(tmp_path / "nowhere"), None)


def test_missing_dataset_names_layout_archives_and_demo(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"VOCdevkit/VOC2012/JPEGImages.*VOCtrainval_11-May-2012.tar.*crossflow synth voc"):
        VOC12SegDataModule(str(tmp_path)).setup("fit")


# ------------------------------------------------------------------------------------------------ augmentation
@pytest.mark.parametrize("scale_range, agreement", [((1.0, 1.0), 1.0), ((0.5, 1.5), 0.8)])
def test_augmentation_keeps_image_and_mask_aligned(scale_range, agreement):
    """Blocks whose colour encodes their label stay aligned with the mask through scale, crop, pad and flip
    (exactly without rescaling; rescaled, only pixels at block borders mix colours)."""
    torch.manual_seed(0)
    labels = torch.arange(12, dtype=torch.uint8).repeat_interleave(40).view(3, 160).repeat_interleave(40, dim=0)  # [120, 160]
    labels[:, -20:] = 255
    image = (labels.float() / 20).expand(3, -1, -1).clone()
    for _ in range(20):
        crop_image, crop_mask = random_scale_crop_flip(image, labels, 193, scale_range)
        assert crop_image.shape == (3, 193, 193) and crop_mask.shape == (193, 193)
        points, point_labels = sample_labelled_pixels(crop_mask, 256)
        colour = crop_image[0, points[:, 1].long(), points[:, 0].long()]
        assert (point_labels != 255).all()
        assert ((colour * 20 - point_labels).abs() < 0.01).float().mean() >= agreement


def test_pixel_sampling_avoids_void_and_repeats_only_when_needed():
    torch.manual_seed(0)
    mask = torch.full((10, 10), 255, dtype=torch.uint8)
    mask[2:4, 3:8] = 7  # 10 labelled pixels
    points, labels = sample_labelled_pixels(mask, 8)
    assert (labels == 7).all() and len({tuple(p) for p in points.tolist()}) == 8
    points, labels = sample_labelled_pixels(mask, 30)
    assert (labels == 7).all() and len({tuple(p) for p in points.tolist()}) <= 10
    assert (mask[points[:, 1].long(), points[:, 0].long()] == 7).all()
    _, labels = sample_labelled_pixels(torch.full((4, 4), 255, dtype=torch.uint8), 5)
    assert (labels == 255).all()


def test_loss_ignores_void_and_is_zero_without_labels():
    logits = torch.randn(2, 3, NUM_CLASSES)
    labels = torch.tensor([[1, 255, 4], [255, 255, 0]])
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1)[[0, 2, 5]], torch.tensor([1, 4, 0]))
    assert torch.allclose(sampled_pixel_loss(logits, labels), expected)
    assert sampled_pixel_loss(logits, torch.full((2, 3), 255)) == 0


# ------------------------------------------------------------------------------------------------ mean IU
def iu_of(*updates) -> torch.Tensor:
    metric = intersection_over_union()
    for preds, target in updates:
        metric.update(torch.tensor(preds), torch.tensor(target))
    return metric.compute()


def test_mean_iu_on_a_hand_worked_confusion_matrix_with_absent_classes():
    # target: 0 0 0 1 1 2 255 ; prediction: 0 0 1 1 3 2 0 (the void pixel is ignored)
    # class 0: TP 2, FP 0, FN 1 -> 2/3; class 1: TP 1, FP 1, FN 1 -> 1/3; class 2: 1/1;
    # class 3: predicted once, never true -> 0/1 = 0; classes 4..20: absent from both -> 0/0, left out.
    per_class = iu_of(([0, 0, 1, 1, 3, 2, 0], [0, 0, 0, 1, 1, 2, 255]))
    torch.testing.assert_close(per_class[:4], torch.tensor([2 / 3, 1 / 3, 1.0, 0.0]))
    assert per_class[4:].isnan().all()
    assert math.isclose(mean_iu(per_class), (2 / 3 + 1 / 3 + 1 + 0) / 4, rel_tol=1e-6)


def test_mean_iu_accumulates_the_confusion_matrix_over_the_whole_set():
    # image 1: four background pixels, all right; image 2: two aeroplane pixels called background.
    # Whole set: class 0 TP 4, FP 2 -> 2/3; class 1 TP 0, FN 2 -> 0; mIU 1/3 (a mean of per-image mIUs gives 1/2).
    per_class = iu_of(([0, 0, 0, 0], [0, 0, 0, 0]), ([0, 0], [1, 1]))
    assert math.isclose(mean_iu(per_class), 1 / 3, rel_tol=1e-6)


def test_mean_iu_equals_torchmetrics_macro_average():
    """torchmetrics' macro average leaves out classes with an empty union too: our mean is the same number."""
    torch.manual_seed(0)
    target = torch.randint(0, 6, (1000,))
    target[::7] = 255
    preds = torch.where(torch.rand(1000) < 0.6, target.clamp(max=5), torch.randint(0, 8, (1000,)))
    macro = MulticlassJaccardIndex(num_classes=NUM_CLASSES, ignore_index=255, average="macro")
    macro.update(preds, target)
    per_class = iu_of((preds.tolist(), target.tolist()))
    assert math.isclose(mean_iu(per_class), macro.compute(), rel_tol=1e-6)


# ------------------------------------------------------------------------------------------------ model
def test_fc6_needs_193_pixel_inputs_and_smaller_images_are_padded():
    assert AlexNet().min_input_size() == 193
    network = AlexNet().eval()
    with torch.no_grad():
        assert network(torch.zeros(1, 3, 193, 193))["fc7"].shape[-2:] == (1, 1)
        with pytest.raises(RuntimeError):
            network(torch.zeros(1, 3, 192, 192))
        model = VOC12Segmentation(hidden_dim=16).eval()
        assert model.dense_logits(torch.zeros(1, 3, 100, 140)).shape == (1, NUM_CLASSES, 100, 140)


@pytest.mark.parametrize("size", [(215, 250), (120, 150)])
def test_dense_inference_equals_sparse_inference_at_the_same_pixels(size):
    torch.manual_seed(0)
    model = VOC12Segmentation(hidden_dim=64, dense_chunk=5000).eval()
    torch.nn.init.normal_(model.head.mlp[0].bias)  # a non-zero first bias, so the tap-sum head's bias is exercised
    images = torch.randn(2, 3, *size)
    points = torch.stack([torch.randint(0, size[1], (2, 300)), torch.randint(0, size[0], (2, 300))], dim=-1).float()
    with torch.no_grad():
        dense = model.dense_logits(images)
        sparse = model.sparse_logits(images, points)
    batch = torch.arange(2)[:, None]
    at_points = dense.permute(0, 2, 3, 1)[batch, points[..., 1].long(), points[..., 0].long()]
    torch.testing.assert_close(at_points, sparse, rtol=1e-4, atol=1e-4)


def test_two_stages_freeze_then_fine_tune_the_backbone(tmp_path):
    assert stage_learning_rates(0, 3, 0.01, 0.001, [2, 4], 0.1) == (0.01, 0.0)
    assert stage_learning_rates(2, 3, 0.01, 0.001, [2, 4], 0.1) == (0.01, 0.0)
    assert stage_learning_rates(3, 3, 0.01, 0.001, [2, 4], 0.1) == (0.001, 0.001)
    assert stage_learning_rates(5, 3, 0.01, 0.001, [2, 4], 0.1) == pytest.approx((1e-4, 1e-4))
    assert stage_learning_rates(7, 3, 0.01, 0.001, [2, 4], 0.1) == pytest.approx((1e-5, 1e-5))

    torch.manual_seed(0)
    backbone_file = save_backbone(AlexNet(), tmp_path / "backbone.pt")
    model = VOC12Segmentation(backbone=str(backbone_file), hidden_dim=16, stage1_steps=2, stage1_lr=0.01, stage2_lr=0.01)
    images = torch.randn(2, 3, 3, 193, 193)
    points = torch.randint(0, 193, (2, 3, 8, 2)).float()
    labels = torch.randint(0, NUM_CLASSES, (2, 3, 8))
    loader = DataLoader(TensorDataset(images.flatten(0, 1), points.flatten(0, 1), labels.flatten(0, 1)), batch_size=3)
    changed = []

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.before = (module.backbone.conv("conv1").weight.clone(), module.head.mlp[0].weight.clone())

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            backbone, head = self.before
            now = module.backbone.conv("conv1").weight, module.head.mlp[0].weight
            changed.append((not torch.equal(backbone, now[0]), not torch.equal(head, now[1])))

    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Watch()], default_root_dir=tmp_path)
    trainer.fit(model, loader)
    assert changed == [(False, True), (False, True), (True, True), (True, True)]


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("name", ["voc12_seg", "demo_voc12_seg"])
def test_configs_parse_and_follow_the_protocol(name, capsys):
    with pytest.raises(SystemExit):
        crossflow_main(["fit", "--config", str(REPO / "configs" / "eval" / f"{name}.yaml"), "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    assert model["taps"] == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"]  # paper section 4.5
    assert model["stage2_lr"] < model["stage1_lr"] and model["stage1_steps"] < config["trainer"]["max_steps"]
    if name == "voc12_seg":  # Larsson et al.'s code: 40k steps at 1e-3, /10 at 22.5k and 30k; 10 x 128 pixels
        assert config["trainer"]["max_steps"] - model["stage1_steps"] == 40000
        assert model["stage2_milestones"] == [22500, 30000] and model["stage2_lr"] == 0.001
        assert (data["train_split"], data["val_split"]) == ("train_aug", "val")
        assert (data["batch_size"], data["num_points"], data["crop_size"]) == (10, 128, 448)


def uniform_chance_miu(voc_root: Path) -> float:
    """Expected mIU of labelling each pixel uniformly at random among the 21 classes (from the val masks)."""
    voc_dir = year_dir(voc_root, "2012")
    counts = np.zeros(NUM_CLASSES)
    for image_id in read_image_set(voc_dir, "val", "Segmentation"):
        mask = read_label_png(voc_dir / "SegmentationClass" / f"{image_id}.png")
        counts += np.bincount(mask[mask != 255], minlength=NUM_CLASSES)[:NUM_CLASSES]
    p = counts / counts.sum()
    # class c: TP = N p_c / 21, predicted N / 21, true N p_c -> IU = (p_c / 21) / (p_c + 1/21 - p_c / 21)
    iu = (p / NUM_CLASSES) / (p + 1 / NUM_CLASSES - p / NUM_CLASSES)
    return float(iu.mean())


@pytest.mark.slow
def test_demo_config_end_to_end_learns(tmp_path, monkeypatch):
    """Synthetic world -> fit (both stages) -> dense test -> results.json, above chance and above the untrained model.

    40 steps on 12 images learn mostly the background (the demo's full schedule learns object classes too).
    """
    monkeypatch.chdir(tmp_path)  # the config's relative runs/ folder lands here
    monkeypatch.setenv("WANDB_SILENT", "true")
    voc_root = tmp_path / "voc"
    assert crossflow_main(["synth", "voc", "--out", str(voc_root), "--num-images", "24", "--seed", "3"]) == 0
    config = str(REPO / "configs" / "eval" / "demo_voc12_seg.yaml")
    overrides = ["--data.init_args.root", str(voc_root), "--trainer.max_steps", "40", "--model.init_args.stage1_steps", "36",
                 "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0"]
    run = tmp_path / "runs" / "eval" / "demo_voc12_seg"
    assert crossflow_main(["test", "--config", config, *overrides]) == 0  # the untrained head, for comparison
    untrained = json.loads((run / "results.json").read_text())["metrics"]["mIU"]

    assert crossflow_main(["fit", "--config", config, *overrides]) == 0
    checkpoint = run / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"] == 40
    assert crossflow_main(["test", "--config", config, *overrides, "--ckpt_path", str(checkpoint)]) == 0
    results = json.loads((run / "results.json").read_text())
    per_class = results["per_class"]["IU"]
    assert list(per_class) == list(SEG_CLASSES)
    present = [value for value in per_class.values() if value is not None]  # absent classes are JSON null
    assert math.isclose(results["metrics"]["mIU"], float(np.mean(present)), rel_tol=1e-6)
    assert results["backbone"] == "random" and results["config"]["model"]["stage1_steps"] == 36
    assert results["metrics"]["mIU"] > max(2 * untrained, 3 * uniform_chance_miu(voc_root))
