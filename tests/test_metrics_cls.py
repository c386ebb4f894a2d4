"""VOC07 classification AP (evals.metrics.VOCClassificationAP) against hand-worked cases and sklearn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score
from torchmetrics.classification import MultilabelAveragePrecision

from evals.metrics import VOCClassificationAP, average_precision


def ap_of(scores, labels) -> float:
    """AP of one class via the metric: scores [N], VOC labels [N] in {1, 0, -1}."""
    metric = VOCClassificationAP(num_classes=1, average="none")
    metric.update(torch.tensor(scores, dtype=torch.float32)[:, None], torch.tensor(labels)[:, None])
    return metric.compute().item()  # torchmetrics squeezes a one-element result


def sklearn_reference(scores: np.ndarray, labels: np.ndarray, tie_epsilon: float = 0.0) -> float:
    """Kraehenbuehl's evaluation line: sklearn AP over the non-difficult images of score - eps * label."""
    kept = labels != 0
    positive = (labels[kept] == 1).astype(int)
    return average_precision_score(positive, scores[kept] - tie_epsilon * positive)


def test_hand_worked_ranking():
    # ranks 1..4 = pos, neg, pos, neg: AP = (1/1 + 2/3) / 2
    assert ap_of([0.9, 0.8, 0.7, 0.6], [1, -1, 1, -1]) == pytest.approx(5 / 6)


def test_ties_form_one_threshold():
    # one tied group of 2 positives + 1 negative: P = 2/3 at R = 1
    assert ap_of([1.0, 1.0, 1.0], [1, 1, -1]) == pytest.approx(2 / 3)
    # tied pairs: P = 1/2 at R = 1/2 (first pair), P = 2/4 at R = 1 (second pair)
    assert ap_of([0.5, 0.5, 0.3, 0.3, 0.1], [1, -1, 1, -1, -1]) == pytest.approx(0.5)


def test_grouped_ties_equal_kraehenbuehls_pessimistic_tie_break():
    # his code ranks score - 1e-5 * label (negatives first within a tie): same step-wise AP
    scores, labels = np.array([2.0, 1.0, 1.0, 1.0, 0.0]), np.array([-1, 1, -1, 1, 1])
    assert ap_of(scores, labels) == pytest.approx(sklearn_reference(scores, labels, tie_epsilon=1e-5), abs=1e-12)
    # by hand: the tie group (2 pos, 1 neg) ends at rank 4 with P = 2/4, R = 2/3; then P = 3/5, R = 1
    assert ap_of(scores, labels) == pytest.approx(2 / 3 * 2 / 4 + 1 / 3 * 3 / 5)


def test_difficult_images_are_ignored_per_class():
    # the top-scoring image is difficult for this class: it counts neither as positive nor as negative
    assert ap_of([0.99, 0.9, 0.8, 0.7], [0, 1, -1, 1]) == pytest.approx(ap_of([0.9, 0.8, 0.7], [1, -1, 1]))
    assert ap_of([0.99, 0.9, 0.8, 0.7], [0, 1, -1, 1]) == pytest.approx((1 + 2 / 3) / 2)


def test_class_without_positives_scores_zero_with_a_warning():
    with pytest.warns(UserWarning, match="no positive"):
        assert ap_of([0.3, 0.2, 0.1], [-1, -1, -1]) == 0.0
    with pytest.warns(UserWarning, match="no positive"):  # difficult-only images are not positives
        assert ap_of([0.3, 0.2, 0.1], [0, -1, 0]) == 0.0


def test_map_is_the_mean_over_classes_and_batches_accumulate():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(40, 20)).astype(np.float32)
    labels = rng.choice([-1, -1, -1, 0, 1], size=(40, 20))
    labels[0] = 1  # every class has a positive
    per_class = [sklearn_reference(scores[:, c], labels[:, c]) for c in range(20)]
    metric = VOCClassificationAP()
    for chunk in np.array_split(np.arange(40), 3):
        metric.update(torch.from_numpy(scores[chunk]), torch.from_numpy(labels[chunk]))
    assert metric.compute().item() == pytest.approx(np.mean(per_class), abs=1e-12)


@pytest.mark.parametrize("tie_epsilon", [0.0, 1e-5])
def test_matches_sklearn_on_random_tied_scores(tie_epsilon):
    """sklearn on the raw scores, and on Kraehenbuehl's shifted ones (integer scores: no near-ties)."""
    rng = np.random.default_rng(1)
    for _ in range(200):
        n = int(rng.integers(2, 60))
        labels = rng.choice([-1, 0, 1], size=n, p=[0.6, 0.1, 0.3])
        labels[0] = 1
        scores = rng.integers(-3, 4, size=n).astype(np.float32)  # many ties
        assert ap_of(scores, labels) == pytest.approx(sklearn_reference(scores, labels, tie_epsilon), abs=1e-12)


def test_agrees_with_torchmetrics_on_probabilities():
    # MultilabelAveragePrecision(ignore_index) is the same definition when scores lie in [0, 1]
    rng = np.random.default_rng(2)
    scores = torch.from_numpy(np.round(rng.uniform(size=(50, 20)), 1).astype(np.float32))
    labels = torch.from_numpy(rng.choice([-1, -1, 0, 1], size=(50, 20)))
    labels[0] = 1
    ours = VOCClassificationAP(average="none")(scores, labels)
    reference = MultilabelAveragePrecision(20, average="none", ignore_index=-5)(scores, torch.where(labels == 0, -5, (labels == 1).long()))
    torch.testing.assert_close(ours.float(), reference, atol=1e-6, rtol=0)


def test_torchmetrics_sigmoid_saturation_is_why_we_do_not_use_it():
    # summed logits 40 > 30: the positive ranks first (AP 1); torchmetrics' float32 sigmoid ties them
    scores, labels = torch.tensor([[40.0, 40.0], [30.0, 30.0]]), torch.tensor([[1, 1], [-1, -1]])
    assert VOCClassificationAP(num_classes=2)(scores, labels).item() == 1.0
    assert MultilabelAveragePrecision(2, ignore_index=-1)(scores, (labels == 1).long()).item() == pytest.approx(0.5)


def test_pure_function_handles_single_and_empty_inputs():
    assert average_precision(torch.tensor([0.2]), torch.tensor([True])).item() == 1.0
    assert average_precision(torch.zeros(0), torch.zeros(0, dtype=torch.bool)).item() == 0.0


def test_rejects_labels_outside_voc_convention():
    with pytest.raises(ValueError, match="1 \\(present\\), 0 \\(difficult\\) or -1"):
        VOCClassificationAP(num_classes=1).update(torch.zeros(2, 1), torch.tensor([[2], [1]]))
