"""PASCAL VOC2007 classification by fine-tuning (Kraehenbuehl et al.'s protocol, as used by the paper).

A new 20-way linear layer on fc7 (dropout 0.5 after fc6 and fc7) is trained with a per-class
sigmoid cross-entropy on VOC2007 trainval, "difficult" labels ignored; at test time the scores of
10 random crops (the training augmentation) are summed per image, and the metric is the mean over
classes of sklearn's AP over the images not "difficult" for that class (``evals.metrics``).

Numbers from Kraehenbuehl et al.'s voc-classification code (src/train_cls.py, the code "[24]"
Larsson et al. distribute and the paper uses): SGD momentum 0.9, lr 1e-3 (biases 2x) halved every
10k iterations, 80k iterations at batch 16, weight decay 1e-6 on weights and biases, gradient
L2 norm clipped at 10, new layer N(0, 0.01) with bias 0.1, augmentation scale in [0.5, 2] with
mirroring (``RandomScaleCrop``). Input size: 224, where this padded AlexNet's pool5 is 6x6 and
fc6/fc7 are 1x1 (the caffe AlexNet used 227).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF

from crossflow.errors import InvalidInputError
from crossflow.models.alexnet import CONV_LAYERS
from crossflow.models.backbone import IMAGE_MEAN, IMAGE_STD
from evals.common import BackboneProvenance, EvalDataModule, backbone_from_spec, setup_backbone, write_results
from evals.metrics import VOCClassificationAP
from evals.voc import VOC_CLASSES, classification_labels, parse_annotation, read_image_set, year_dir

# Which backbone layers are fine-tuned: the paper's "all", Kraehenbuehl's "all_fc" (--train-from pool5)
# and "fc8" (--train-from drop7: only the new layer).
TRAINED_LAYERS = {"all": CONV_LAYERS, "fc6-8": ("fc6", "fc7"), "new": ()}


class RandomScaleCrop:
    """A random square window of the image, mirrored at random, resampled to ``size x size``.

    What "scale" means (as in the caffe TransformationLayer of Kraehenbuehl's code): the window's
    side is ``scale * size`` input pixels, ``scale ~ U[min_scale, max_scale]``, so scale < 1 zooms
    in and scale > 1 zooms out. The range is capped so the window fits in the image
    (``scale <= min(H, W) / size``, ``min_scale`` lowered to that cap for small images): the crop
    never needs padding. The window's position is uniform over the positions inside the image;
    resampling is plain bilinear (no antialiasing), like the caffe layer.

    ``image [3, H, W]`` float -> ``[3, size, size]``.
    """

    def __init__(self, size: int, min_scale: float = 0.5, max_scale: float = 2.0, flip: bool = True):
        if not 0 < min_scale <= max_scale:
            raise InvalidInputError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.size, self.min_scale, self.max_scale, self.flip = size, min_scale, max_scale, flip

    def __call__(self, image: Tensor) -> Tensor:
        height, width = image.shape[-2:]
        high = min(self.max_scale, height / self.size, width / self.size)
        low = min(self.min_scale, high)
        side = float(torch.empty(()).uniform_(low, high)) * self.size
        top = int(float(torch.empty(()).uniform_(0, height - side)))
        left = int(float(torch.empty(()).uniform_(0, width - side)))
        crop = TF.resized_crop(image, top, left, round(side), round(side), [self.size, self.size], antialias=False)
        if self.flip and torch.rand(()) < 0.5:
            crop = crop.flip(-1)
        return crop


class VOCClassificationDataset(Dataset):
    """VOC images of one ImageSets/Main split with their 20 labels.

    Item: ``(image, labels)``; image ``[3, S, S]`` (``crops=None``) or ``[crops, 3, S, S]`` (independent
    draws of ``transform``), normalised; labels ``[20]`` int8: 1 present, 0 difficult only, -1 absent.
    """

    def __init__(self, voc_dir: Path, split: str, transform: RandomScaleCrop, crops: int | None = None):
        self.voc_dir, self.transform, self.crops = Path(voc_dir), transform, crops
        self.ids = read_image_set(self.voc_dir, split, "Main")
        self.labels = torch.stack([self.read_labels(image_id) for image_id in self.ids])

    def read_labels(self, image_id: str) -> Tensor:
        annotation = parse_annotation(self.voc_dir / "Annotations" / f"{image_id}.xml")
        return torch.from_numpy(classification_labels(annotation))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        with Image.open(self.voc_dir / "JPEGImages" / f"{self.ids[index]}.jpg") as image:
            pixels = TF.to_dtype(TF.pil_to_tensor(image.convert("RGB")), torch.float32, scale=True)
        if self.crops is None:
            return self.view(pixels), self.labels[index]
        return torch.stack([self.view(pixels) for _ in range(self.crops)]), self.labels[index]

    def view(self, pixels: Tensor) -> Tensor:
        return TF.normalize(self.transform(pixels), IMAGE_MEAN, IMAGE_STD)


class VOC07ClassificationData(EvalDataModule):
    """VOC2007 ``train_split`` (augmented crops) for fit, ``test_split`` (``test_crops`` crops per image) for test.

    ``root``: a folder holding ``VOCdevkit/VOC2007`` (or that folder itself).
    """

    def __init__(
        self,
        root: str = "data/voc",
        crop_size: int = 224,
        min_scale: float = 0.5,
        max_scale: float = 2.0,
        test_crops: int = 10,
        batch_size: int = 16,
        test_batch_size: int = 4,
        num_workers: int = 4,
        train_split: str = "trainval",
        test_split: str = "test",
    ):
        super().__init__()
        self.save_hyperparameters()
        self.transform = RandomScaleCrop(crop_size, min_scale, max_scale)

    def setup(self, stage: str) -> None:
        voc_dir = year_dir(self.hparams.root, "2007")
        if stage == "fit":
            self.train_set = VOCClassificationDataset(voc_dir, self.hparams.train_split, self.transform)
        if stage == "test":
            self.test_set = VOCClassificationDataset(voc_dir, self.hparams.test_split, self.transform, self.hparams.test_crops)

    def train_dataloader(self) -> DataLoader:
        return self.train_loader(self.train_set, self.hparams.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.eval_loader(self.test_set, self.hparams.test_batch_size)


def sigmoid_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Kraehenbuehl's loss: summed binary cross-entropy over the (image, class) pairs whose label is
    not 0 (difficult), divided by the batch size. ``logits, labels [B, C]`` -> scalar."""
    weight = (labels != 0).to(logits.dtype)
    target = (labels == 1).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum") / logits.shape[0]


class VOC07Classification(BackboneProvenance, L.LightningModule):
    """Fine-tunes the backbone with a new 20-way layer on fc7; tests with summed multi-crop scores.

    Args:
        backbone: a backbone file (crossflow export or torchvision AlexNet), "random" or "random-rescaled".
        rebalance: re-balance the backbone before fine-tuning (Kraehenbuehl et al.'s between-layer step alone, as
            magic_init does to a trained network; :func:`evals.common.setup_backbone`). The paper reports without it.
        train_layers: "all" (the paper), "fc6-8" (fc6, fc7 and the new layer) or "new" (the new layer only).
        dropout: dropout after fc6 and after fc7 (while training).
    """

    def __init__(
        self,
        backbone: str = "random",
        rebalance: bool = False,
        train_layers: Literal["all", "fc6-8", "new"] = "all",
        dropout: float = 0.5,
        lr: float = 1e-3,
        bias_lr_mult: float = 2.0,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        lr_step: int = 10000,
        lr_gamma: float = 0.5,
    ):
        super().__init__()
        self.save_hyperparameters()
        if train_layers not in TRAINED_LAYERS:
            raise InvalidInputError(f"train_layers must be one of {sorted(TRAINED_LAYERS)}, got {train_layers!r}")
        self.network = backbone_from_spec(backbone).train()  # no BN; the dropout is ours
        for name in CONV_LAYERS:
            self.network.layers[name].requires_grad_(name in TRAINED_LAYERS[train_layers])
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.network.conv("fc7").out_channels, len(VOC_CLASSES))
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.constant_(self.classifier.bias, 0.1)
        self.test_ap = VOCClassificationAP(len(VOC_CLASSES), average="none")

    def setup(self, stage: str) -> None:
        setup_backbone(self, self.network, stage)

    def forward(self, images: Tensor) -> Tensor:
        """``images [B, 3, S, S]`` (S = 224) -> class scores ``[B, 20]``."""
        pool5 = self.network(images, taps=("pool5",))["pool5"]
        if pool5.shape[-2:] != (6, 6):
            raise InvalidInputError(
                f"input {tuple(images.shape[-2:])} gives a {tuple(pool5.shape[-2:])} pool5 map; the classifier needs 6x6 "
                "(fc6, fc7 1x1): use crop_size 224"
            )
        fc7 = self.dropout(self.network.layers["fc7"](self.dropout(self.network.layers["fc6"](pool5))))
        return self.classifier(fc7.flatten(1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        loss = sigmoid_cross_entropy(self(images), labels)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        crops, labels = batch  # [B, K, 3, S, S], [B, 20]
        scores = self(crops.flatten(0, 1)).unflatten(0, crops.shape[:2]).sum(1)
        self.test_ap.update(scores, labels)

    def on_test_epoch_end(self) -> None:
        ap = self.test_ap.compute()
        self.test_ap.reset()
        self.log("test/mAP", ap.mean().float())
        write_results(self, "voc07_cls", {"mAP": ap.mean().item()}, {"AP": dict(zip(VOC_CLASSES, ap.tolist()))})

    def configure_optimizers(self):
        trained = [(name, p) for name, p in self.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for name, p in trained if not name.endswith("bias")], "lr": self.hparams.lr},
            {"params": [p for name, p in trained if name.endswith("bias")], "lr": self.hparams.lr * self.hparams.bias_lr_mult},
        ]
        # not fused like the other evals' SGD: Lightning refuses gradient clipping (the configs clip) with a fused
        # optimizer under mixed precision
        optimizer = torch.optim.SGD(groups, lr=self.hparams.lr, momentum=self.hparams.momentum, weight_decay=self.hparams.weight_decay)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, self.hparams.lr_step, self.hparams.lr_gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
