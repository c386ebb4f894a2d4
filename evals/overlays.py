"""Prediction overlays logged to W&B at test time: detections as boxes, segmentations as coloured masks.

Drawing is torchvision's (``draw_bounding_boxes``, ``draw_segmentation_masks``); images are ``uint8 [3, H, W]``.
Each overlay puts the ground truth and the prediction side by side.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid

from crossflow.data.synthetic import PALETTE
from crossflow.models.backbone import IMAGE_MEAN, IMAGE_STD
from evals.voc import VOC_CLASSES, VOID_LABEL

TRUTH_COLOUR, PREDICTION_COLOUR = (0, 255, 0), (255, 64, 0)


def to_uint8(image: Tensor) -> Tensor:
    """A normalised image ``[3, H, W]`` (IMAGE_MEAN/STD) -> ``uint8 [3, H, W]`` RGB."""
    rgb = image.detach().float().cpu() * torch.tensor(IMAGE_STD).view(3, 1, 1) + torch.tensor(IMAGE_MEAN).view(3, 1, 1)
    return (rgb.clamp(0, 1) * 255).round().to(torch.uint8)


def side_by_side(images: list[Tensor]) -> Tensor:
    """Equal-size ``uint8 [3, H, W]`` images in one row on white."""
    return make_grid(images, nrow=len(images), padding=2, pad_value=255)


def draw_boxes(image: Tensor, boxes: Tensor, labels: Tensor, colour: tuple, scores: Tensor | None = None) -> Tensor:
    """Boxes ``[K, 4]`` (x1, y1, x2, y2 in pixels) labelled with VOC class names (and scores) on ``image``."""
    if len(boxes) == 0:
        return image
    names = [VOC_CLASSES[int(label)] for label in labels]
    texts = names if scores is None else [f"{name} {float(score):.2f}" for name, score in zip(names, scores)]
    return draw_bounding_boxes(image, boxes.detach().float().cpu(), labels=texts, colors=colour, width=2)


def detection_comparison(image: Tensor, truth: dict, prediction: dict, scale: float, min_score: float = 0.3) -> Tensor:
    """Ground truth | detections with score >= ``min_score``, on the network's input ``image [3, H, W]`` (normalised).

    ``truth``: ``boxes [G, 4]`` in input pixels, ``labels [G]`` (0..19); ``prediction``: ``boxes [K, 4]`` in the
    original image's pixels (as :func:`evals.fast_rcnn.detect` returns them), ``labels``, ``scores``; ``scale``:
    input pixels per original pixel. Returns ``uint8 [3, H, 2W + 6]``.
    """
    picture = to_uint8(image)
    kept = prediction["scores"] >= min_score
    predicted = draw_boxes(picture, prediction["boxes"][kept] * scale, prediction["labels"][kept], PREDICTION_COLOUR, prediction["scores"][kept])
    return side_by_side([draw_boxes(picture, truth["boxes"], truth["labels"], TRUTH_COLOUR), predicted])


def draw_mask(image: Tensor, mask: Tensor, alpha: float = 0.6) -> Tensor:
    """Object classes of ``mask [H, W]`` (1..20) in VOC's colours over ``image``; background (0) and void (255) undrawn."""
    classes = [int(c) for c in mask.unique() if c not in (0, VOID_LABEL)]
    if not classes:
        return image
    masks = mask.cpu()[None] == torch.tensor(classes).view(-1, 1, 1)
    colours = [tuple(PALETTE[3 * c : 3 * c + 3]) for c in classes]
    return draw_segmentation_masks(image, masks, alpha=alpha, colors=colours)


def segmentation_comparison(image: Tensor, truth: Tensor, prediction: Tensor) -> Tensor:
    """Ground truth | predicted classes over ``image [3, H, W]`` (normalised); masks ``[H, W]``. Returns ``uint8 [3, H, 2W + 6]``."""
    picture = to_uint8(image)
    return side_by_side([draw_mask(picture, truth), draw_mask(picture, prediction)])


class OverlayCollector:
    """Keeps the first ``limit`` overlays of a test run and logs them to the trainer's W&B loggers under ``key``."""

    def __init__(self, key: str, limit: int = 4):
        self.key, self.limit = key, limit
        self.images: list[Tensor] = []
        self.captions: list[str] = []

    @property
    def full(self) -> bool:
        return len(self.images) >= self.limit

    def add(self, draw, caption: str) -> None:
        """Calls ``draw()`` (-> ``uint8 [3, H, W]``) and keeps its picture, unless ``limit`` are already kept."""
        if not self.full:
            self.images.append(draw())
            self.captions.append(caption)

    def log(self, trainer: L.Trainer) -> None:
        """Logs the kept overlays to every WandbLogger of ``trainer`` as ``key/0``, ``key/1``... (a key each: the
        images differ in size), then forgets them. Other loggers get nothing."""
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                for index, (image, caption) in enumerate(zip(self.images, self.captions)):
                    logger.log_image(f"{self.key}/{index}", [image.permute(1, 2, 0).numpy()], caption=[caption])
        self.images, self.captions = [], []
