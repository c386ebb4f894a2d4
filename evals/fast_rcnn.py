"""Fast R-CNN (Girshick, ICCV 2015) on an AlexNet backbone: network, RoI sampling, loss, detection.

Boxes are ``x1, y1, x2, y2`` in 0-based pixel coordinates with inclusive ends (VOC's
convention shifted by one), in the pixels of the image the network sees unless stated.
Box regression targets are torchvision's encoding (centre offsets over size, log size
ratios) divided by Fast R-CNN's (0.1, 0.1, 0.2, 0.2), i.e. ``BoxCoder(weights=(10, 10, 5, 5))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import RoIPool, batched_nms, box_iou

from crossflow.models.alexnet import AlexNet

BBOX_STD = (0.1, 0.1, 0.2, 0.2)  # Fast R-CNN's BBOX_NORMALIZE_STDS (means 0)
BOX_CODER = BoxCoder(weights=tuple(1.0 / s for s in BBOX_STD))
POOLED_SIZE = 6


class FastRCNN(nn.Module):
    """conv1-conv5 (stride 16) -> RoI max pool 6x6 -> fc6, fc7 (from the backbone, with dropout)
    -> class scores ``[R, C]`` and class-specific box deltas ``[R, 4C]`` (C = 21 incl. background).

    The network holds the backbone itself (``self.backbone``, trained in place): fc6 and fc7 are its 6x6 and
    1x1 convolutions applied to the ``[R, 256, 6, 6]`` pooled RoIs as fully connected layers (the same map).
    RoI coordinates are shifted by conv5's offset before pooling: conv5 feature ``j`` is centred on pixel
    ``16 j + offset`` (offset 0 for the crossflow AlexNet, 15 for the torchvision one).

    Args:
        backbone: an AlexNet whose conv1-conv5, fc6 and fc7 initialise the network.
        num_classes: object classes + 1 (background is class 0).
        dropout: after fc6 and fc7.
        train_conv1: False freezes conv1 (as Fast R-CNN did for its small networks).
    """

    def __init__(self, backbone: AlexNet, num_classes: int = 21, dropout: float = 0.5, train_conv1: bool = True):
        super().__init__()
        self.num_classes = num_classes
        self.backbone = backbone
        stride, self.feature_offset = backbone.geometry["conv5"]
        self.roi_pool = RoIPool((POOLED_SIZE, POOLED_SIZE), spatial_scale=1.0 / stride)
        self.dropout = nn.Dropout(dropout)
        hidden = backbone.channels["fc7"]
        self.cls_score = nn.Linear(hidden, num_classes)
        self.bbox_pred = nn.Linear(hidden, 4 * num_classes)
        for layer, std in ((self.cls_score, 0.01), (self.bbox_pred, 0.001)):  # Fast R-CNN's initialisation
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)
        backbone.layers["conv1"].requires_grad_(train_conv1)
        self.train()  # backbones are loaded in eval mode

    def features(self, images: Tensor) -> Tensor:
        """images ``[B, 3, H, W]`` -> conv5 ``[B, 256, H / 16, W / 16]``."""
        return self.backbone(images, taps=("conv5",))["conv5"]

    def fc(self, pooled: Tensor) -> Tensor:
        """Pooled RoIs ``[R, 256, 6, 6]`` -> fc7 ``[R, 4096]``: fc6, ReLU, dropout, fc7, ReLU, dropout."""
        hidden = pooled
        for name in ("fc6", "fc7"):  # each conv + ReLU, a matrix product on the one-kernel input (Conv2dFullyConnected)
            hidden = self.dropout(self.backbone.layers[name](hidden))
        return hidden.flatten(1)

    def forward(self, images: Tensor, rois: Tensor) -> tuple[Tensor, Tensor]:
        """images ``[B, 3, H, W]``, rois ``[R, 5]`` (batch index, x1, y1, x2, y2) -> logits ``[R, C]``, deltas ``[R, 4C]``."""
        shifted = torch.cat([rois[:, :1], rois[:, 1:] - self.feature_offset], dim=1)
        hidden = self.fc(self.roi_pool(self.features(images), shifted))
        return self.cls_score(hidden), self.bbox_pred(hidden)


def sample_rois(
    proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor, num_rois: int = 128, fg_fraction: float = 0.25,
    fg_iou: float = 0.5, bg_iou: tuple[float, float] = (0.1, 0.5),
) -> tuple[Tensor, Tensor, Tensor]:
    """Fast R-CNN's minibatch sampling for one image; the ground-truth boxes join the proposals.

    proposals ``[P, 4]``, gt_boxes ``[G >= 1, 4]``, gt_labels ``[G]`` (1..C-1) -> rois ``[R, 4]``,
    labels ``[R]`` (0 = background), regression targets ``[R, 4]``; R <= num_rois: up to
    ``round(fg_fraction * num_rois)`` foreground (IoU >= fg_iou) drawn at random, the rest
    background (IoU in [bg_iou[0], bg_iou[1])) as far as there are.
    """
    boxes = torch.cat([gt_boxes, proposals])
    best_iou, assigned = box_iou(boxes, gt_boxes).max(dim=1)
    fg = torch.nonzero(best_iou >= fg_iou).squeeze(1)
    bg = torch.nonzero((best_iou >= bg_iou[0]) & (best_iou < bg_iou[1])).squeeze(1)
    fg = fg[torch.randperm(len(fg))[: min(round(fg_fraction * num_rois), len(fg))]]
    bg = bg[torch.randperm(len(bg))[: num_rois - len(fg)]]
    keep = torch.cat([fg, bg])
    labels = gt_labels[assigned[keep]].clone()
    labels[len(fg):] = 0
    targets = BOX_CODER.encode_single(gt_boxes[assigned[keep]], boxes[keep])
    return boxes[keep], labels, targets


def fast_rcnn_loss(logits: Tensor, deltas: Tensor, labels: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax cross-entropy and smooth L1 (beta 1) on the true class's deltas of foreground RoIs,
    summed and divided by the number of RoIs (Fast R-CNN). logits ``[R, C]``, deltas ``[R, 4C]``,
    labels ``[R]``, targets ``[R, 4]`` -> (loss_cls, loss_box)."""
    loss_cls = F.cross_entropy(logits, labels)
    fg = torch.nonzero(labels > 0).squeeze(1)
    fg_deltas = deltas.reshape(len(labels), -1, 4)[fg, labels[fg]]
    loss_box = F.smooth_l1_loss(fg_deltas, targets[fg], beta=1.0, reduction="sum") / max(len(labels), 1)
    return loss_cls, loss_box


def clip_boxes(boxes: Tensor, height: int, width: int) -> Tensor:
    """Clamp ``[..., 4]`` boxes inside an image (inclusive ends: x in [0, width - 1])."""
    limits = boxes.new_tensor([width - 1, height - 1, width - 1, height - 1])
    return torch.minimum(boxes.clamp(min=0), limits)


def detect(
    logits: Tensor, deltas: Tensor, proposals: Tensor, height: int, width: int,
    score_thresh: float = 0.05, nms_iou: float = 0.3, max_detections: int = 100,
) -> dict[str, Tensor]:
    """One image's outputs -> detections ``{"boxes": [K, 4], "scores": [K], "labels": [K] (0..C-2)}``.

    logits ``[P, C]``, deltas ``[P, 4C]``, proposals ``[P, 4]`` in the coordinates of the
    ``height`` x ``width`` image the boxes are wanted in: softmax scores, class-specific box
    decoding, clipping, score threshold, per-class NMS, the top ``max_detections`` kept.
    """
    num_classes = logits.shape[1]
    scores = F.softmax(logits, dim=1)[:, 1:]
    boxes = clip_boxes(BOX_CODER.decode_single(deltas, proposals).reshape(-1, num_classes, 4)[:, 1:], height, width)
    labels = torch.arange(num_classes - 1, device=logits.device).expand_as(scores)
    boxes, scores, labels = boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)
    keep = torch.nonzero(scores > score_thresh).squeeze(1)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = batched_nms(boxes, scores, labels, nms_iou)[:max_detections]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
