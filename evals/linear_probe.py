"""ImageNet linear probing of a frozen backbone (Zhang et al.'s split-brain protocol, as used by the paper).

The backbone is frozen and stays in eval mode. The activations after the ReLU of conv1..conv5 are
resized bilinearly to ``s x s``, ``s = round(sqrt(9216 / C))`` for a layer of C channels ("roughly
9,000-10,000 elements", paper section 4.5; 9216 = pool5's 256 x 6 x 6). For the crossflow (and
caffe) AlexNet that is Zhang et al.'s 10x10, 6x6, 5x5, 5x5, 6x6 (9600, 9216, 9600, 9600, 9216 values);
for the torchvision one (64, 192, 384, 256, 256 channels) 12x12, 7x7, 5x5, 6x6, 6x6 (9216, 9408,
9600, 9216, 9216). Each goes through a parameter-free batch norm and a
linear layer to the classes; the five heads train jointly from one backbone forward. Top-1 on
ILSVRC-2012 val per layer is the paper's Table 2.

Numbers (Zhang et al., split-brain autoencoders, CVPR 2017, linear classification): SGD momentum
0.9, lr 0.01 divided by 10 every 40k iterations, 140k iterations at batch 256, weight decay 5e-4;
random crop + flip for training, centre crop for validation. Input 224 (this padded AlexNet's
size; caffe's was 227) cropped from images resized to shorter side 256. The resize is plain
bilinear interpolation (``F.interpolate``, ``align_corners=False``, no antialiasing).

Data: ``ROOT/train/<wnid>/*.JPEG`` and ``ROOT/val/<wnid>/*.JPEG`` (ImageFolder). Class indices are
the sorted folder names of train/ (for ImageNet: the sorted wnids, i.e. the standard order,
tench n01440764 = 0); val/ is labelled with train's indices. A flat val/ (the official archive's
``ILSVRC2012_val_*.JPEG``) is refused with instructions to sort it into class folders.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from crossflow.errors import InvalidInputError, MissingInputError
from crossflow.models.backbone import IMAGE_MEAN, IMAGE_STD
from evals.common import BackboneProvenance, EvalDataModule, backbone_from_spec, setup_backbone, write_results

PROBE_TAPS = ("conv1", "conv2", "conv3", "conv4", "conv5")
PROBE_VALUES = 9216  # about this many values per probed tap (pool5's 256 x 6 x 6)
ARCHIVE_HINT = (
    "get ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz from image-net.org "
    "(ILSVRC 2012 downloads, after registering)"
)
DEMO_HINT = "or run the demo on the synthetic world: `crossflow synth imagenet --out data/demo/imagenet` (make eval-linear DEMO=1)"


def probe_sizes(channels: dict[str, int]) -> dict[str, int]:
    """Side ``s`` each probed tap is resized to, ``round(sqrt(PROBE_VALUES / C))``, from the network's ``{layer: C}``."""
    return {tap: round(math.sqrt(PROBE_VALUES / channels[tap])) for tap in PROBE_TAPS}


def probe_dims(channels: dict[str, int]) -> dict[str, int]:
    """Feature length of each probed tap: ``{tap: C * s^2}``."""
    return {tap: channels[tap] * size * size for tap, size in probe_sizes(channels).items()}


def probe_features(activations: dict[str, Tensor], sizes: dict[str, int]) -> dict[str, Tensor]:
    """``{tap: [B, C, h, w]}`` -> ``{tap: [B, C * s * s]}``, each resized bilinearly to ``s = sizes[tap]``."""
    return {
        tap: F.interpolate(activations[tap], size=(size, size), mode="bilinear", align_corners=False).flatten(1)
        for tap, size in sizes.items()
    }


def check_class_folders(split_dir: Path) -> None:
    """A clear error when ``split_dir`` is missing or is the official archive's flat image folder."""
    if not split_dir.is_dir():
        raise MissingInputError(
            f"ImageNet split not found: expected {split_dir}/<wnid>/*.JPEG (ImageFolder layout: ROOT/train/<wnid>/, "
            f"ROOT/val/<wnid>/); {ARCHIVE_HINT}, and extract them into class folders; {DEMO_HINT}"
        )
    if any(name.startswith("ILSVRC2012_val_") for name in os.listdir(split_dir)):
        raise InvalidInputError(
            f"{split_dir} holds the flat ILSVRC2012 validation images; sort them into {split_dir}/<wnid>/ folders with the "
            "devkit's ground truth (ILSVRC2012_validation_ground_truth.txt + meta.mat). One way: move this folder aside, put "
            "ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz in the root, and run "
            f"`python -c \"import torchvision; torchvision.datasets.ImageNet('{split_dir.parent}', split='val')\"`, "
            "which extracts and sorts them into val/<wnid>/"
        )


class LabelledImageFolder(ImageFolder):
    """An ImageFolder labelled with a given class list (the train folder's), so that a split with
    fewer class folders keeps the same indices; a folder not in the list is an error."""

    def __init__(self, root: str | Path, classes: list[str], transform=None):
        self.given_classes = list(classes)
        super().__init__(root, transform=transform, allow_empty=True)
        if not self.samples:
            raise MissingInputError(f"no images found under {root}/<class>/")

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        found = {entry.name for entry in os.scandir(directory) if entry.is_dir()}
        unknown = sorted(found - set(self.given_classes))
        if unknown:
            raise InvalidInputError(f"{directory} has class folders absent from the training classes: {unknown[:5]}")
        return self.given_classes, {name: index for index, name in enumerate(self.given_classes)}


def keep_first_per_class(folder: ImageFolder, count: int) -> None:
    """Truncate ``folder`` in place to the first ``count`` samples (ImageFolder's sorted order) of each class."""
    if count < 1:
        raise InvalidInputError(f"train_per_class must be at least 1 (got {count}); leave it unset to train on every image")
    kept, taken = [], Counter()
    for path, target in folder.samples:
        taken[target] += 1
        if taken[target] <= count:
            kept.append((path, target))
    folder.samples = folder.imgs = kept
    folder.targets = [target for _, target in kept]


class ImageNetData(EvalDataModule):
    """ImageNet-style folders: train/ with random crop + flip, val/ with a centre crop (used by validate and test).

    ``num_classes`` (after construction) is the number of class folders in train/. ``train_per_class``: train on
    only the first N images (sorted file names) of each class, a low-shot probe (None: all; the paper's protocol).
    """

    def __init__(
        self,
        root: str = "data/imagenet",
        crop_size: int = 224,
        resize_size: int = 256,
        batch_size: int = 256,
        val_batch_size: int = 256,
        num_workers: int = 8,
        train_per_class: int | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.root = Path(root)
        normalise = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGE_MEAN, IMAGE_STD)]
        self.train_transform = v2.Compose(
            [v2.ToImage(), v2.Resize(resize_size), v2.RandomCrop(crop_size), v2.RandomHorizontalFlip(), *normalise]
        )
        self.val_transform = v2.Compose([v2.ToImage(), v2.Resize(resize_size), v2.CenterCrop(crop_size), *normalise])

    @property
    def classes(self) -> list[str]:
        check_class_folders(self.root / "train")
        return sorted(entry.name for entry in os.scandir(self.root / "train") if entry.is_dir())

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def setup(self, stage: str) -> None:
        classes = self.classes
        if stage == "fit":
            self.train_set = LabelledImageFolder(self.root / "train", classes, self.train_transform)
            if self.hparams.train_per_class is not None:
                keep_first_per_class(self.train_set, self.hparams.train_per_class)
        check_class_folders(self.root / "val")
        self.val_set = LabelledImageFolder(self.root / "val", classes, self.val_transform)

    def train_dataloader(self) -> DataLoader:
        return self.train_loader(self.train_set, self.hparams.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader(self.val_set, self.hparams.val_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class LinearProbe(BackboneProvenance, L.LightningModule):
    """Five linear classifiers (conv1..conv5) on a frozen backbone, trained jointly.

    Args:
        backbone: a backbone file (crossflow export or torchvision AlexNet), "random" or "random-rescaled".
        num_classes: 1000 for ImageNet; must equal the data's class count.
    """

    def __init__(
        self,
        backbone: str = "random",
        num_classes: int = 1000,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        lr_step: int = 40000,
        lr_gamma: float = 0.1,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.backbone = backbone_from_spec(backbone).requires_grad_(False).eval()
        self.probe_sizes = probe_sizes(self.backbone.channels)
        self.heads = nn.ModuleDict({
            tap: nn.Sequential(nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, num_classes))
            for tap, dim in probe_dims(self.backbone.channels).items()
        })
        self.val_top1 = nn.ModuleDict({tap: MulticlassAccuracy(num_classes, top_k=1, average="micro") for tap in PROBE_TAPS})
        self.test_top1 = nn.ModuleDict({tap: MulticlassAccuracy(num_classes, top_k=1, average="micro") for tap in PROBE_TAPS})

    def train(self, mode: bool = True) -> "LinearProbe":
        """The heads follow ``mode``; the frozen backbone always stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    def setup(self, stage: str) -> None:
        data_classes = getattr(self.trainer.datamodule, "num_classes", self.hparams.num_classes)
        if data_classes != self.hparams.num_classes:
            raise InvalidInputError(f"the data has {data_classes} classes but model.num_classes is {self.hparams.num_classes}")
        setup_backbone(self, self.backbone, stage)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """``images [B, 3, S, S]`` -> ``{tap: logits [B, num_classes]}``."""
        with torch.no_grad():
            features = probe_features(self.backbone(images, taps=PROBE_TAPS), self.probe_sizes)
        return {tap: self.heads[tap](feature) for tap, feature in features.items()}

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, targets = batch
        losses = {tap: F.cross_entropy(logits, targets) for tap, logits in self(images).items()}
        self.log_dict({f"train/loss_{tap}": loss for tap, loss in losses.items()})
        return sum(losses.values())

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_top1)
        self.log_dict({f"val/top1_{tap}": metric for tap, metric in self.val_top1.items()})

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_top1)

    def _evaluate(self, batch: tuple[Tensor, Tensor], metrics: nn.ModuleDict) -> None:
        images, targets = batch
        for tap, logits in self(images).items():
            metrics[tap].update(logits, targets)

    def on_test_epoch_end(self) -> None:
        top1 = {f"top1_{tap}": metric.compute().item() for tap, metric in self.test_top1.items()}
        for metric in self.test_top1.values():
            metric.reset()
        self.log_dict({f"test/{name}": value for name, value in top1.items()})
        write_results(self, "in1k_linear", top1, {})

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(
            self.heads.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum, weight_decay=self.hparams.weight_decay, fused=True
        )
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, self.hparams.lr_step, self.hparams.lr_gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
