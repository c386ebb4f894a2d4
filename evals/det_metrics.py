"""The official PASCAL VOC detection AP as a torchmetrics Metric (so it syncs under DDP).

Definition (VOCdevkit ``VOCevaldet.m`` and the widely used ``voc_eval.py`` of Fast R-CNN):
per class, all detections of the test set are sorted by score (descending); each one is
matched to the ground-truth box of its image with the largest IoU, where IoU uses VOC's
+1 pixel convention (area ``(x2 - x1 + 1) * (y2 - y1 + 1)``). It is a true positive when
that IoU is above 0.5 and the box is not yet taken (then it is taken), a false positive
when the IoU is at most 0.5 or the box is taken (a duplicate); when the best box is
marked difficult the detection counts neither way. Difficult boxes are not positives.
Precision/recall over the ranked list give AP: VOC2007's 11-point interpolation
(mean over recall thresholds t = 0, 0.1, ..., 1 of the best precision at recall >= t), or
with ``use_07_metric=False`` the area under the monotone precision envelope (VOC2010+).

The thresholds are the doubles nearest k/10, so a recall of exactly 3/10 counts at t = 0.3
(voc_eval.py's ``np.arange(0., 1.1, 0.1)`` holds 0.30000000000000004, 0.6000000000000001 and
0.7000000000000001, which miss recalls of exactly 3/10, 6/10, 7/10: a floating-point artefact).

Whether a ground-truth box is already taken only depends on the detections of the same
image ranked before, so each image is matched when it arrives (``update``) and only
``(score, label, is_tp, is_fp)`` per detection and positives per class are kept: flat
tensors that concatenate across processes. Ties in score keep the input order (stable sort).

A class without any non-difficult ground truth has no defined AP (recall is 0/0; the
devkit's arithmetic returns 0 or NaN depending on the variant): its AP is NaN and the
mAP is the mean over the classes that have positives.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat
from torchvision.ops import box_iou

IOU_THRESHOLD = 0.5  # strictly above, as "exceed 50%" in the VOC rules and voc_eval.py


def voc_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU ``[N, M]`` of xyxy boxes ``[N, 4]``, ``[M, 4]`` with VOC's inclusive pixel ends (+1 widths)."""
    one = boxes1.new_tensor([0.0, 0.0, 1.0, 1.0])
    return box_iou(boxes1 + one, boxes2.to(boxes1.dtype) + one)


def match_image(boxes: Tensor, scores: Tensor, gt_boxes: Tensor, gt_difficult: Tensor) -> tuple[Tensor, Tensor]:
    """VOC greedy matching of one image's detections of one class.

    boxes ``[K, 4]``, scores ``[K]``, gt_boxes ``[G, 4]``, gt_difficult ``[G]`` bool
    -> ``(tp, fp)`` bool ``[K]`` in the input order (both False: matched a difficult box).
    """
    tp = torch.zeros(len(boxes), dtype=torch.bool)
    fp = torch.zeros(len(boxes), dtype=torch.bool)
    if len(gt_boxes) == 0:
        fp[:] = True
        return tp, fp
    iou = voc_box_iou(boxes.double(), gt_boxes.double())
    best_iou, best = iou.max(dim=1)  # first maximum on ties, as the devkit's strict '>' scan
    taken = torch.zeros(len(gt_boxes), dtype=torch.bool)
    for k in torch.argsort(scores, descending=True, stable=True).tolist():
        j = best[k]
        if best_iou[k] <= IOU_THRESHOLD:
            fp[k] = True
        elif not gt_difficult[j]:
            if taken[j]:
                fp[k] = True
            else:
                tp[k] = taken[j] = True
    return tp, fp


def average_precision(recall: Tensor, precision: Tensor, use_07_metric: bool = True) -> Tensor:
    """AP from the ranked list's recall and precision ``[N]`` (float64 scalar)."""
    if use_07_metric:
        ap = recall.new_zeros(())
        for t in torch.arange(11, dtype=recall.dtype) / 10:  # exact tenths (see the module doc)
            above = precision[recall >= t]
            ap = ap + (above.max() if len(above) else 0.0) / 11
        return ap
    mrec = torch.cat([recall.new_zeros(1), recall, recall.new_ones(1)])
    mpre = torch.cat([precision.new_zeros(1), precision, precision.new_zeros(1)])
    mpre = torch.flip(torch.cummax(torch.flip(mpre, [0]), 0).values, [0])  # precision envelope
    change = torch.nonzero(mrec[1:] != mrec[:-1]).squeeze(1)
    return ((mrec[change + 1] - mrec[change]) * mpre[change + 1]).sum()


class VOCDetectionAP(Metric):
    """PASCAL VOC detection AP per class and mAP (labels 0..num_classes-1).

    ``update(preds, targets)``: torchmetrics' detection format, one dict per image;
    preds ``{"boxes": [K, 4] xyxy pixels, "scores": [K], "labels": [K]}``,
    targets ``{"boxes": [G, 4], "labels": [G], "difficult": [G] bool (optional, default False)}``.
    ``compute()`` -> ``{"map": scalar, "ap_per_class": [num_classes]}`` (NaN for a class without positives).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, use_07_metric: bool = True, num_classes: int = 20, **kwargs):
        super().__init__(**kwargs)
        self.use_07_metric = use_07_metric
        self.num_classes = num_classes
        for name in ("det_scores", "det_labels", "det_tp", "det_fp"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.add_state("num_positives", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: list[dict[str, Tensor]], targets: list[dict[str, Tensor]]) -> None:
        if len(preds) != len(targets):
            raise ValueError(f"got {len(preds)} predictions for {len(targets)} targets")
        rows = [self._match(p, t) for p, t in zip(preds, targets)]
        for name, values in zip(("det_scores", "det_labels", "det_tp", "det_fp"), zip(*rows)):
            getattr(self, name).append(torch.cat(values).to(self.device, torch.float32))

    def _match(self, pred: dict[str, Tensor], target: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One image -> (scores, labels, tp, fp) ``[K]`` each; counts its positives."""
        boxes, scores, labels = (pred[k].detach().cpu() for k in ("boxes", "scores", "labels"))
        gt_boxes, gt_labels = target["boxes"].cpu(), target["labels"].cpu().long()
        difficult = target.get("difficult", torch.zeros(len(gt_labels), dtype=torch.bool)).cpu().bool()
        self.num_positives += torch.bincount(gt_labels[~difficult], minlength=self.num_classes).to(self.num_positives.device)
        tp, fp = torch.zeros(len(boxes), dtype=torch.bool), torch.zeros(len(boxes), dtype=torch.bool)
        for c in labels.unique().tolist():
            det, gt = labels == c, gt_labels == c
            tp[det], fp[det] = match_image(boxes[det], scores[det], gt_boxes[gt], difficult[gt])
        return scores.float(), labels.float(), tp, fp

    def compute(self) -> dict[str, Tensor]:
        scores, labels, tp, fp = (dim_zero_cat(getattr(self, n)).double() for n in ("det_scores", "det_labels", "det_tp", "det_fp"))
        ap = torch.full((self.num_classes,), float("nan"), dtype=torch.float64)
        for c in range(self.num_classes):
            positives = int(self.num_positives[c])
            if positives == 0:
                continue
            order = torch.argsort(scores[labels == c], descending=True, stable=True)
            tp_cum = torch.cumsum(tp[labels == c][order], 0)
            fp_cum = torch.cumsum(fp[labels == c][order], 0)
            recall = tp_cum / positives
            precision = tp_cum / torch.clamp(tp_cum + fp_cum, min=torch.finfo(torch.float64).eps)
            ap[c] = average_precision(recall, precision, self.use_07_metric)
        ap = ap.float()
        return {"map": torch.nanmean(ap), "ap_per_class": ap}
