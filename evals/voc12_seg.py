"""PASCAL VOC2012 semantic segmentation with a sparse hypercolumn head (paper §4.5, Table 1 column 6).

Protocol: Larsson et al.'s two-stage hypercolumn fine-tuning ("Colorization as a Proxy Task for Visual
Understanding", CVPR 2017), as the paper used it. The pretraining MLP is discarded; a new hypercolumn over
conv1..conv5, fc6, fc7 (fc6/fc7 applied convolutionally) feeds an MLP with one hidden layer to 21 classes.
Training reads the hypercolumn at a fixed number of sampled non-void pixels per image (cross-entropy, 255
ignored); stage one trains the head with the backbone frozen, stage two fine-tunes everything at a lower
learning rate. Train data: VOC2012 train + SBD ("train_aug", 10,582 images), random scale, crop and flip.
Test: dense prediction at full resolution on the 1,449 VOC2012 val images; mean IU over the 21 classes from
the confusion matrix accumulated over the whole set (torchmetrics), per-class IU reported.

Layout read here::

    ROOT/VOCdevkit/VOC2012/{JPEGImages/*.jpg, SegmentationClass/*.png, ImageSets/Segmentation/{train,val}.txt}
    SBD_ROOT/{cls/*.mat, train.txt, val.txt}     SBD's benchmark_RELEASE/dataset (Hariharan et al., ICCV 2011)
    AUG_LABEL_DIR/*.png                          or the pre-converted "SegmentationClassAug" label PNGs

Small inputs: fc6 is a 6x6 convolution over pool5, so it is defined only for inputs of at least
:meth:`AlexNet.min_input_size <crossflow.models.alexnet.AlexNet.min_input_size>` pixels a side (193 for the crossflow
AlexNet, 223 for the torchvision one). Smaller images are zero-padded at the bottom and right (zero is
the mean colour after normalisation) before the backbone runs; pixel coordinates are unchanged, and only the
original pixels are predicted and scored.

Dense test: the head runs at every pixel through ``HypercolumnMLP.forward_dense`` in chunks of ``dense_chunk``
pixels. Its first layer is applied to each tap at the tap's own resolution before sampling (exact, see
``HypercolumnMLP.project_taps``), which makes full-resolution inference cheap; tests check it equals the sparse path.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import scipy.io
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassJaccardIndex

from crossflow.errors import InvalidInputError, MissingInputError
from crossflow.models.alexnet import LAYERS
from crossflow.models.backbone import IMAGE_MEAN, IMAGE_STD
from crossflow.models.hypercolumn import HypercolumnMLP, sparse_hypercolumn
from evals.common import BackboneProvenance, EvalDataModule, backbone_from_spec, setup_backbone, write_results
from evals.overlays import OverlayCollector, segmentation_comparison
from evals.voc import VOC_CLASSES, VOID_LABEL, read_image_set, read_rgb, read_segmentation_mask, year_dir

SEG_CLASSES = ("background",) + VOC_CLASSES
NUM_CLASSES = len(SEG_CLASSES)  # 21
TAPS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7")  # the paper's §4.5 segmentation hypercolumn
SBD_HINT = (
    "train_aug needs the SBD annotations (Hariharan et al.): extract benchmark.tgz from "
    "http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz and pass "
    "--data.init_args.sbd_root .../benchmark_RELEASE/dataset (cls/*.mat, train.txt, val.txt), or pass "
    "--data.init_args.aug_label_dir with the pre-converted SegmentationClassAug PNGs; "
    "or use --data.init_args.train_split train (VOC2012 train only, not the paper's protocol)"
)


# ----------------------------------------------------------------------------------------------- geometry
def pad_to_min_size(images: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad ``[B, 3, H, W]`` at the bottom/right to at least ``size`` a side (pixel coordinates unchanged)."""
    height, width = images.shape[-2:]
    return F.pad(images, (0, max(0, size - width), 0, max(0, size - height)))


# ----------------------------------------------------------------------------------------------- labels
def read_label_png(path: str | Path) -> np.ndarray:
    """A label PNG -> ``[H, W]`` uint8: VOC's palette PNGs, or the grayscale SegmentationClassAug ones."""
    with Image.open(path) as image:
        mode = image.mode
    if mode == "P":
        return read_segmentation_mask(path)
    if mode != "L":
        raise InvalidInputError(f"{path}: expected a palette (VOC) or grayscale (SegmentationClassAug) label PNG, got mode {mode}")
    with Image.open(path) as image:
        return np.array(image, dtype=np.uint8)


def read_sbd_mask(path: str | Path) -> np.ndarray:
    """SBD's ``cls/<id>.mat`` -> ``GTcls.Segmentation`` as ``[H, W]`` uint8 class indices (0..20)."""
    record = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
    return np.asarray(record["GTcls"].Segmentation, dtype=np.uint8)


def read_label(path: Path) -> np.ndarray:
    return read_sbd_mask(path) if path.suffix == ".mat" else read_label_png(path)


def sbd_dataset_dir(sbd_root: str | Path) -> Path:
    """SBD's ``dataset`` folder, given it or ``benchmark_RELEASE`` above it; a clear error if absent."""
    root = Path(sbd_root)
    for candidate in (root, root / "dataset", root / "benchmark_RELEASE" / "dataset"):
        if (candidate / "cls").is_dir():
            return candidate
    raise MissingInputError(f"SBD not found under {root}: expected {root}/cls/*.mat and {root}/{{train,val}}.txt; "
                            f"{SBD_HINT}")


def train_aug_samples(voc_dir: Path, sbd_root: str | None, aug_label_dir: str | None) -> list[tuple[Path, Path]]:
    """The standard train_aug set: (VOC2012 seg train ∪ SBD train ∪ SBD val) − VOC2012 seg val (10,582 images).

    Labels come from ``aug_label_dir`` when given (it covers the VOC images too), otherwise from VOC's own
    SegmentationClass PNG where one exists (finer, with void borders) and else from SBD's .mat file.
    Returns ``[(image path, label path)]`` sorted by image id.
    """
    voc_train = set(read_image_set(voc_dir, "train", "Segmentation"))
    voc_val = set(read_image_set(voc_dir, "val", "Segmentation"))
    if aug_label_dir is not None:
        labels = {path.stem: path for path in sorted(Path(aug_label_dir).glob("*.png"))}
        if not labels:
            raise MissingInputError(f"no label PNGs in {aug_label_dir} (expected SegmentationClassAug/<id>.png); {SBD_HINT}")
        missing = sorted(voc_train - labels.keys())
        if missing:
            raise MissingInputError(f"{aug_label_dir} lacks labels for VOC2012 train images, e.g. {missing[0]}.png")
    elif sbd_root is not None:
        sbd = sbd_dataset_dir(sbd_root)
        sbd_ids = set(read_ids(sbd / "train.txt")) | set(read_ids(sbd / "val.txt"))
        labels = {i: sbd / "cls" / f"{i}.mat" for i in sbd_ids}
        labels.update({i: voc_dir / "SegmentationClass" / f"{i}.png" for i in voc_train})
    else:
        raise InvalidInputError(f"train_split 'train_aug' needs sbd_root or aug_label_dir; {SBD_HINT}")
    ids = sorted((voc_train | labels.keys()) - voc_val)
    return [(voc_dir / "JPEGImages" / f"{i}.jpg", labels[i]) for i in ids]


def read_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise MissingInputError(f"image list not found: {path}; {SBD_HINT}")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def voc_samples(voc_dir: Path, split: str) -> list[tuple[Path, Path]]:
    """``ImageSets/Segmentation/<split>.txt`` with its SegmentationClass PNGs -> ``[(image, label)]``."""
    return [
        (voc_dir / "JPEGImages" / f"{i}.jpg", voc_dir / "SegmentationClass" / f"{i}.png")
        for i in read_image_set(voc_dir, split, "Segmentation")
    ]


def check_exist(samples: list[tuple[Path, Path]]) -> None:
    for pair in samples:
        for path in pair:
            if not path.is_file():
                raise MissingInputError(f"missing {path} (expected the standard VOCdevkit/SBD layouts)")


# ----------------------------------------------------------------------------------------------- data
def normalised_image(path: Path) -> torch.Tensor:
    """An image file -> ``[3, H, W]`` float32, RGB in [0, 1] normalised with IMAGE_MEAN/IMAGE_STD."""
    image = torch.from_numpy(read_rgb(path)).permute(2, 0, 1).float() / 255
    return TF.normalize(image, list(IMAGE_MEAN), list(IMAGE_STD))


def random_scale_crop_flip(
    image: torch.Tensor, mask: torch.Tensor, crop_size: int, scale_range: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rescale, ``crop_size`` square crop and horizontal flip of ``image [3, H, W]`` and ``mask [H, W]``.

    Image bilinear, mask nearest; where the scaled image is smaller than the crop it is placed at a random
    position and padded with 0 (the mean colour) and void (255). Returns ``[3, S, S]``, ``[S, S]``.
    """
    scale = torch.empty(()).uniform_(*scale_range).item()
    size = [max(1, round(mask.shape[0] * scale)), max(1, round(mask.shape[1] * scale))]
    image = TF.resize(image, size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    mask = TF.resize(mask[None], size, interpolation=TF.InterpolationMode.NEAREST_EXACT)[0]
    pad_h, pad_w = max(0, crop_size - size[0]), max(0, crop_size - size[1])
    top, left = int(torch.randint(pad_h + 1, ())), int(torch.randint(pad_w + 1, ()))
    padding = (left, pad_w - left, top, pad_h - top)
    image, mask = F.pad(image, padding), F.pad(mask, padding, value=VOID_LABEL)
    y0 = int(torch.randint(mask.shape[0] - crop_size + 1, ()))
    x0 = int(torch.randint(mask.shape[1] - crop_size + 1, ()))
    image, mask = image[:, y0 : y0 + crop_size, x0 : x0 + crop_size], mask[y0 : y0 + crop_size, x0 : x0 + crop_size]
    if torch.rand(()) < 0.5:
        image, mask = image.flip(-1), mask.flip(-1)
    return image, mask


def sample_labelled_pixels(mask: torch.Tensor, num_points: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_points`` random non-void pixels of ``mask [H, W]`` -> points ``[N, 2]`` (x, y) float, labels ``[N]`` long.

    Without replacement when there are enough labelled pixels, with replacement otherwise; a mask without
    labelled pixels gives void labels (ignored by the loss).
    """
    flat = mask.reshape(-1)
    pool = (flat != VOID_LABEL).nonzero().squeeze(1)
    if len(pool) == 0:
        pool = torch.arange(len(flat))
    if len(pool) >= num_points:
        index = pool[torch.randperm(len(pool))[:num_points]]
    else:
        index = pool[torch.randint(len(pool), (num_points,))]
    width = mask.shape[1]
    points = torch.stack([index % width, index // width], dim=-1).float()
    return points, flat[index].long()


class SegmentationTrainSet(Dataset):
    """Augmented crops with sampled pixels: ``(image [3, S, S], points [N, 2] (x, y), labels [N])``."""

    def __init__(self, samples: list[tuple[Path, Path]], crop_size: int, scale_range: tuple[float, float], num_points: int):
        self.samples, self.crop_size, self.scale_range, self.num_points = samples, crop_size, scale_range, num_points

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        image_path, label_path = self.samples[index]
        mask = torch.from_numpy(read_label(label_path))
        image, mask = random_scale_crop_flip(normalised_image(image_path), mask, self.crop_size, self.scale_range)
        points, labels = sample_labelled_pixels(mask, self.num_points)
        return image, points, labels


class SegmentationEvalSet(Dataset):
    """Full-resolution images and masks: ``(image [3, H, W], mask [H, W] long, 255 void)``."""

    def __init__(self, samples: list[tuple[Path, Path]]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        image_path, label_path = self.samples[index]
        return normalised_image(image_path), torch.from_numpy(read_label(label_path)).long()


class VOC12SegDataModule(EvalDataModule):
    """VOC2012 segmentation: train on ``train_split`` (augmented, sampled pixels), validate/test on ``val_split``.

    Args:
        root: folder holding ``VOCdevkit/VOC2012`` (or that folder itself).
        train_split: ``train_aug`` (the protocol: VOC2012 train + SBD, needs ``sbd_root`` or ``aug_label_dir``)
            or a VOC ``ImageSets/Segmentation`` split such as ``train``.
        sbd_root: SBD's ``benchmark_RELEASE/dataset`` (or ``benchmark_RELEASE``).
        aug_label_dir: pre-converted SegmentationClassAug PNGs (used instead of ``sbd_root``).
        val_split: the evaluation split (``val``: 1,449 images).
        crop_size, scale_range: training augmentation (random scale in the range, square crop, flip).
        num_points: labelled pixels sampled per training image.
        batch_size: training images per batch (evaluation runs one full-resolution image at a time).
    """

    def __init__(
        self,
        root: str,
        train_split: str = "train_aug",
        sbd_root: str | None = None,
        aug_label_dir: str | None = None,
        val_split: str = "val",
        crop_size: int = 448,
        scale_range: tuple[float, float] = (0.5, 1.5),
        num_points: int = 128,
        batch_size: int = 10,
        num_workers: int = 4,
    ):
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        hp = self.hparams
        voc_dir = year_dir(hp.root, "2012")
        if stage == "fit":
            if hp.train_split == "train_aug":
                samples = train_aug_samples(voc_dir, hp.sbd_root, hp.aug_label_dir)
            else:
                samples = voc_samples(voc_dir, hp.train_split)
            check_exist(samples)
            rank_zero_info(f"VOC12 segmentation: {len(samples)} training images ({hp.train_split})")
            self.train_set = SegmentationTrainSet(samples, hp.crop_size, tuple(hp.scale_range), hp.num_points)
        samples = voc_samples(voc_dir, hp.val_split)
        check_exist(samples)
        self.eval_set = SegmentationEvalSet(samples)

    def train_dataloader(self) -> DataLoader:
        return self.train_loader(self.train_set, self.hparams.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader(self.eval_set, 1)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


# ----------------------------------------------------------------------------------------------- metric
def intersection_over_union() -> MulticlassJaccardIndex:
    """Per-class IU ``TP / (TP + FP + FN)`` from the confusion matrix accumulated over every update, 255 ignored.

    A class absent from both ground truth and predictions has IU 0/0: it is NaN here and left out of
    :func:`mean_iu` (torchmetrics' ``average="macro"`` does the same). VOC's devkit would give NaN for the
    mean; on the real VOC2012 val set every class occurs, so the two agree there.
    """
    return MulticlassJaccardIndex(num_classes=NUM_CLASSES, ignore_index=VOID_LABEL, average=None, zero_division=float("nan"))


def mean_iu(per_class: torch.Tensor) -> torch.Tensor:
    """Mean of the defined per-class IUs ``[C]`` (NaN classes, absent from GT and predictions, left out)."""
    return per_class.nanmean()


# ----------------------------------------------------------------------------------------------- model
def sampled_pixel_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled sampled pixels, ``[B, N, C]`` scores, ``[B, N]`` labels (255 ignored).

    0 (not NaN) when no pixel of the batch is labelled.
    """
    labels = labels.flatten()
    total = F.cross_entropy(logits.flatten(0, 1), labels, ignore_index=VOID_LABEL, reduction="sum")
    return total / (labels != VOID_LABEL).sum().clamp(min=1)


def stage_learning_rates(
    step: int, stage1_steps: int, stage1_lr: float, stage2_lr: float, stage2_milestones: list[int], lr_gamma: float
) -> tuple[float, float]:
    """``(head lr, backbone lr)`` at optimiser step ``step``.

    Stage one (``step < stage1_steps``): head at ``stage1_lr``, backbone frozen (0). Stage two: both at
    ``stage2_lr``, times ``lr_gamma`` at each of ``stage2_milestones`` (counted from the start of stage two).
    """
    if step < stage1_steps:
        return stage1_lr, 0.0
    lr = stage2_lr * lr_gamma ** sum(step - stage1_steps >= m for m in stage2_milestones)
    return lr, lr


class VOC12Segmentation(BackboneProvenance, L.LightningModule):
    """Backbone taps -> sparse hypercolumn -> MLP (one hidden layer) -> 21 class scores per pixel.

    Args:
        backbone: a backbone file (crossflow export or torchvision AlexNet), ``"random"`` or ``"random-rescaled"``.
        rebalance: re-balance the backbone before fine-tuning (Kraehenbuehl et al.'s between-layer step alone, as
            magic_init does to a trained network; :func:`evals.common.setup_backbone`). The paper reports without it.
        taps: backbone layers of the hypercolumn.
        hidden_dim: width of the MLP's hidden layer.
        stage1_steps: optimiser steps of stage one (head only, backbone frozen); stage two follows until
            ``trainer.max_steps``.
        stage1_lr, stage2_lr, stage2_milestones, lr_gamma: see :func:`stage_learning_rates`.
        momentum, weight_decay: SGD settings, both stages.
        dense_chunk: pixels per chunk of dense evaluation (bounds memory).
    """

    def __init__(
        self,
        backbone: str = "random",
        rebalance: bool = False,
        taps: tuple[str, ...] = TAPS,
        hidden_dim: int = 1024,
        stage1_steps: int = 10000,
        stage1_lr: float = 0.002,
        stage2_lr: float = 0.001,
        stage2_milestones: tuple[int, ...] = (22500, 30000),
        lr_gamma: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        dense_chunk: int = 4096,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.backbone = backbone_from_spec(backbone).train()  # no dropout or BN: the mode changes nothing
        self.taps = tuple(taps)
        self.tap_channels = [self.backbone.channels[t] for t in self.taps]
        self.geometry = self.backbone.geometry
        self.min_size = self.backbone.min_input_size(max(self.taps, key=LAYERS.index))
        self.head = HypercolumnMLP(sum(self.tap_channels), hidden_dim, NUM_CLASSES)
        self.val_iu, self.test_iu = intersection_over_union(), intersection_over_union()
        self.overlays = OverlayCollector("test/segmentations")  # a few test images, ground truth | prediction, to W&B

    def activations(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[B, 3, H, W]`` -> the taps' activations (inputs padded to :attr:`min_size` when smaller)."""
        return self.backbone(pad_to_min_size(images, self.min_size), taps=self.taps)

    def sparse_logits(self, images: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Class scores at ``points [B, N, 2]`` (x, y) -> ``[B, N, 21]``."""
        return self.head(sparse_hypercolumn(self.activations(images), points, self.geometry, self.taps))

    def dense_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class scores at every pixel, ``[B, 3, H, W]`` -> ``[B, 21, H, W]``, ``dense_chunk`` pixels at a time."""
        activations = self.activations(images)
        return self.head.forward_dense(activations, self.geometry, self.taps, tuple(images.shape[-2:]), self.hparams.dense_chunk)


    # ------------------------------------------------------------------------------------ training
    def setup(self, stage: str) -> None:
        setup_backbone(self, self.backbone, stage)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self.backbone.requires_grad_(self.global_step >= self.hparams.stage1_steps)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, points, labels = batch
        logits = self.sparse_logits(images, points)
        loss = sampled_pixel_loss(logits, labels)
        labelled = labels != VOID_LABEL
        accuracy = (logits.argmax(-1) == labels)[labelled].float().mean()
        stage = 1 + int(self.global_step >= self.hparams.stage1_steps)
        self.log_dict({"train/loss": loss, "train/pixel_accuracy": accuracy, "train/stage": float(stage)}, prog_bar=True)
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        groups = [{"params": self.head.parameters()}, {"params": self.backbone.parameters()}]
        # Base lr 1: the schedule's lambdas return the absolute learning rate of each group.
        optimizer = torch.optim.SGD(groups, lr=1.0, momentum=hp.momentum, weight_decay=hp.weight_decay, fused=True)
        rates = lambda step: stage_learning_rates(  # noqa: E731
            step, hp.stage1_steps, hp.stage1_lr, hp.stage2_lr, list(hp.stage2_milestones), hp.lr_gamma
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda s: rates(s)[0], lambda s: rates(s)[1]])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------------ evaluation
    def evaluate(self, batch, metric: MulticlassJaccardIndex) -> torch.Tensor:
        """Updates ``metric`` with the dense prediction of ``batch``; returns the prediction ``[B, H, W]``."""
        images, masks = batch
        prediction = self.dense_logits(images).argmax(1)
        metric.update(prediction, masks)
        return prediction

    def validation_step(self, batch, batch_idx: int) -> None:
        self.evaluate(batch, self.val_iu)

    def test_step(self, batch, batch_idx: int) -> None:
        prediction = self.evaluate(batch, self.test_iu)
        self.overlays.add(lambda: segmentation_comparison(batch[0][0], batch[1][0], prediction[0]), f"test image {batch_idx}")

    def on_validation_epoch_end(self) -> None:
        self.log("val/mIU", mean_iu(self.val_iu.compute()), prog_bar=True)
        self.val_iu.reset()

    def on_test_epoch_end(self) -> None:
        per_class = self.test_iu.compute().cpu()
        miu = float(mean_iu(per_class))
        class_iu = dict(zip(SEG_CLASSES, per_class.tolist()))
        self.log_dict({"test/mIU": miu, **{f"test/IU/{name}": value for name, value in class_iu.items()}})
        write_results(self, "voc12_seg", {"mIU": miu}, {"IU": class_iu})
        self.test_iu.reset()
        self.overlays.log(self.trainer)
