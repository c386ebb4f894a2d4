"""The supervised reference: the pretraining AlexNet trained with class labels (the paper's "Class Labels" row).

The same network as :class:`crossflow.module.CrossFlowPretraining` (``AlexNet(batch_norm=True)``, state-dict keys
``backbone.*``, so ``crossflow export`` folds and writes it like any backbone), followed by Krizhevsky et al.'s
classifier: CaffeNet's ``fc6 -> ReLU -> dropout -> fc7 -> ReLU -> dropout -> fc8``, fc6 and fc7 being the
backbone's own layers and fc8 a linear layer to the classes. Loss: cross-entropy of fc8's logits; optimiser:
SGD with momentum and weight decay, the learning rate divided by ``lr_gamma`` every ``lr_step`` steps.

fc6 is a 6x6 convolution over pool5, so inputs must be at least ``AlexNet.min_input_size("fc7")`` = 193 px
(pool5 6x6, fc7 1x1); larger inputs give an fc7 map, whose logits are averaged over its positions.
Data: :class:`evals.linear_probe.ImageNetData` (ImageFolder train/val, random crop + flip, centre crop for val).
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from crossflow.checkpoints import module_from_checkpoint
from crossflow.errors import InvalidInputError
from crossflow.models.alexnet import AlexNet

CLASSIFIER_KEY = "fc8.weight"  # the state-dict entry that tells a supervised checkpoint from a self-supervised one


def is_supervised_checkpoint(checkpoint: dict) -> bool:
    """True for the content of a :class:`SupervisedPretraining` checkpoint (backbone.* and fc8 weights)."""
    state = checkpoint.get("state_dict", {})
    return CLASSIFIER_KEY in state and any(k.startswith("backbone.") for k in state)


def supervised_from_checkpoint(checkpoint: dict) -> "SupervisedPretraining":
    """The content of a supervised checkpoint (read with ``weights_only=True``) -> the module in eval mode."""
    return module_from_checkpoint(SupervisedPretraining, checkpoint)


class SupervisedPretraining(L.LightningModule):
    """AlexNet (BN) + fc8, trained with cross-entropy on labelled images ``(images [B, 3, S, S], labels [B])``.

    Args:
        num_classes: classes of the labelled set (must equal its class-folder count).
        groups: 1, or 2 for CaffeNet's grouped convolutions.
        dropout: drop probability after fc6 and after fc7 (Krizhevsky et al.: 0.5).
        lr, momentum, weight_decay: SGD (Krizhevsky et al.: 0.01, 0.9, 5e-4).
        lr_step, lr_gamma: the lr is multiplied by ``lr_gamma`` every ``lr_step`` training steps.
    """

    def __init__(
        self,
        num_classes: int = 20,
        groups: int = 1,
        dropout: float = 0.5,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        lr_step: int = 100000,
        lr_gamma: float = 0.1,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.backbone = AlexNet(batch_norm=True, groups=groups)
        self.dropout = nn.Dropout(dropout)
        self.fc8 = nn.Linear(self.backbone.channels["fc7"], num_classes)
        nn.init.normal_(self.fc8.weight, std=0.01)  # Krizhevsky et al.'s init of the last layer
        nn.init.zeros_(self.fc8.bias)
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")

    def setup(self, stage: str) -> None:
        data_classes = getattr(self.trainer.datamodule, "num_classes", self.hparams.num_classes)
        if data_classes != self.hparams.num_classes:
            raise InvalidInputError(f"the data has {data_classes} classes but model.num_classes is {self.hparams.num_classes}")

    def forward(self, images: Tensor) -> Tensor:
        """``images [B, 3, H, W]`` (H, W >= 193) -> logits ``[B, num_classes]``."""
        smallest = self.backbone.min_input_size("fc7")
        if min(images.shape[-2:]) < smallest:
            raise InvalidInputError(
                f"inputs of {tuple(images.shape[-2:])} px are too small for fc6/fc7 (at least {smallest} px): "
                f"set data.init_args.crop_size >= {smallest}"
            )
        fc6 = self.backbone(images, ("fc6",))["fc6"]
        fc7 = self.backbone.layers["fc7"](self.dropout(fc6))
        logits = self.fc8(self.dropout(fc7).permute(0, 2, 3, 1))  # [B, h, w, classes]; 1x1 at 193-224 px
        return logits.mean((1, 2))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.val_top1.update(logits, labels)
        self.log("val/loss", F.cross_entropy(logits, labels), prog_bar=True, batch_size=len(labels))
        self.log("val/top1", self.val_top1, prog_bar=True)

    def configure_optimizers(self):
        h = self.hparams
        optimizer = torch.optim.SGD(self.parameters(), lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay, fused=True)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, h.lr_step, h.lr_gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
