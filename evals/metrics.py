"""Metrics of the transfer benchmarks that torchmetrics does not compute exactly as the protocols define them.

Each is a ``torchmetrics.Metric`` (states sync under DDP); one class per benchmark, self-contained.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import rank_zero_warn
from torchmetrics.utilities.data import dim_zero_cat


def average_precision(scores: Tensor, positive: Tensor) -> Tensor:
    """Non-interpolated AP, sklearn's ``average_precision_score``: ``sum_k (R_k - R_{k-1}) P_k``.

    The sum runs over the distinct score values in decreasing order (tied scores form one
    threshold, as in sklearn); P_k, R_k are precision and recall of the images scoring >= the
    k-th value, R_0 = 0. ``scores [N]``, ``positive [N]`` bool -> float64 scalar; 0 when there is
    no positive (sklearn returns 0 with a warning there too).
    """
    scores, order = torch.sort(scores.double(), descending=True, stable=True)
    hits = positive[order].double()
    if hits.sum() == 0:
        return scores.new_zeros(())
    group_end = torch.cat([torch.nonzero(scores[1:] != scores[:-1]).flatten(), scores.new_tensor([len(scores) - 1]).long()])
    true_positives = hits.cumsum(0)[group_end]
    precision = true_positives / (group_end + 1)
    recall = true_positives / true_positives[-1]
    return (torch.diff(recall, prepend=recall.new_zeros(1)) * precision).sum()


class VOCClassificationAP(Metric):
    """VOC07 classification AP per class (Kraehenbuehl et al.'s protocol, used by the paper).

    For class c, sklearn's non-interpolated AP of the scores over the images whose VOC label for
    c is not "difficult" (0); mAP is the mean over the classes.

    ``update(scores [B, C] float, labels [B, C] int)`` with VOC's labels 1 present, 0 difficult
    (ignored for that class), -1 absent. ``compute()`` -> mAP (``average="macro"``) or AP ``[C]``
    (``average="none"``), float64.

    Ties: tied scores form one threshold (sklearn). Kraehenbuehl's voc-classification code passes
    ``score - 1e-5 * label`` to sklearn "to make AP work for tied scores" (the sklearn of 2015
    integrated the PR curve with trapezoids); with today's step-wise AP, breaking an exact tie
    against the positives gives the same value as grouping it, so the shift is not reproduced.

    Why not ``torchmetrics.classification.MultilabelAveragePrecision(ignore_index=...)``: with
    ``thresholds=None`` it implements sklearn's curve (ties grouped, ignored entries dropped per
    label, all-negative label -> 0), but it passes any score outside [0, 1] through a sigmoid in
    the input dtype. Our scores are summed logits; float32 sigmoid saturates (sigmoid(30) ==
    sigmoid(40) == 1.0), turning distinct scores into ties and changing the AP.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int = 20, average: Literal["macro", "none"] = "macro", **kwargs):
        super().__init__(**kwargs)
        if average not in ("macro", "none"):
            raise ValueError(f"average must be 'macro' or 'none', got {average!r}")
        self.num_classes = num_classes
        self.average = average
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, scores: Tensor, labels: Tensor) -> None:
        if scores.shape != labels.shape or scores.ndim != 2 or scores.shape[1] != self.num_classes:
            raise ValueError(f"expected scores and labels of shape [B, {self.num_classes}], got {tuple(scores.shape)} and {tuple(labels.shape)}")
        if not torch.isin(labels, labels.new_tensor([-1, 0, 1])).all():
            raise ValueError("VOC classification labels must be 1 (present), 0 (difficult) or -1 (absent)")
        self.scores.append(scores.detach())
        self.labels.append(labels.detach().to(torch.int8))

    def compute(self) -> Tensor:
        scores, labels = dim_zero_cat(self.scores).double(), dim_zero_cat(self.labels)
        per_class = []
        for c in range(self.num_classes):
            kept = labels[:, c] != 0
            positive = labels[kept, c] == 1
            if not positive.any():
                rank_zero_warn(f"VOC classification AP: class {c} has no positive (non-difficult) image; its AP is 0 (as sklearn)")
            per_class.append(average_precision(scores[kept, c], positive))
        ap = torch.stack(per_class)
        return ap.mean() if self.average == "macro" else ap


from evals.det_metrics import VOCDetectionAP  # noqa: E402,F401  (evals.metrics.VOCDetectionAP)
