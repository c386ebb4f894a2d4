"""VOC detection AP: hand-worked cases, a reference written from the devkit's definition, DDP sync."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evals.det_metrics import VOCDetectionAP, voc_box_iou


def reference_voc_ap(preds: list[dict], targets: list[dict], num_classes: int, use_07_metric: bool) -> np.ndarray:
    """VOC detection AP per class, straight from VOCevaldet.m / voc_eval.py, in plain numpy.

    Per class: all detections of all images sorted by score; each goes to its image, finds the
    ground-truth box of the class with the largest overlap (+1 pixel areas); overlap > 0.5 and the box
    not difficult: TP if not yet detected (then detected) else FP; difficult: ignored; else FP.
    Thresholds of the 11-point AP are the exact tenths. NaN for a class without positives.
    """
    ap = np.full(num_classes, np.nan)
    for c in range(num_classes):
        gt = [(t["boxes"].numpy()[t["labels"].numpy() == c], t["difficult"].numpy()[t["labels"].numpy() == c]) for t in targets]
        npos = sum(int((~d).sum()) for _, d in gt)
        dets = [(float(s), i, b) for i, p in enumerate(preds) for b, s, l in zip(p["boxes"].numpy(), p["scores"].numpy(), p["labels"].numpy()) if l == c]
        order = sorted(range(len(dets)), key=lambda k: -dets[k][0])  # stable: ties keep input order
        detected = [np.zeros(len(b), bool) for b, _ in gt]
        tp, fp = np.zeros(len(dets)), np.zeros(len(dets))
        for rank, k in enumerate(order):
            _, image, bb = dets[k]
            boxes, difficult = gt[image]
            ovmax, jmax = -np.inf, -1
            for j, bbgt in enumerate(boxes):
                iw = min(bb[2], bbgt[2]) - max(bb[0], bbgt[0]) + 1
                ih = min(bb[3], bbgt[3]) - max(bb[1], bbgt[1]) + 1
                if iw > 0 and ih > 0:
                    ua = (bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1) + (bbgt[2] - bbgt[0] + 1) * (bbgt[3] - bbgt[1] + 1) - iw * ih
                    if iw * ih / ua > ovmax:
                        ovmax, jmax = iw * ih / ua, j
            if ovmax > 0.5:
                if not difficult[jmax]:
                    if not detected[image][jmax]:
                        tp[rank], detected[image][jmax] = 1, True
                    else:
                        fp[rank] = 1
            else:
                fp[rank] = 1
        if npos == 0:
            continue
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        rec, prec = tp / npos, tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        if use_07_metric:
            ap[c] = sum((prec[rec >= t].max() if (rec >= t).any() else 0.0) for t in [k / 10 for k in range(11)]) / 11
        else:
            mrec, mpre = np.concatenate([[0.0], rec, [1.0]]), np.concatenate([[0.0], prec, [0.0]])
            for i in range(len(mpre) - 2, -1, -1):
                mpre[i] = max(mpre[i], mpre[i + 1])
            i = np.where(mrec[1:] != mrec[:-1])[0]
            ap[c] = np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])
    return ap


def box(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(-1, 4)


def pred(boxes, scores, labels) -> dict:
    return {"boxes": box(*boxes), "scores": torch.tensor(scores, dtype=torch.float32), "labels": torch.tensor(labels)}


def target(boxes, labels, difficult=None) -> dict:
    difficult = [False] * len(labels) if difficult is None else difficult
    return {"boxes": box(*boxes), "labels": torch.tensor(labels), "difficult": torch.tensor(difficult)}


def ap_of(preds, targets, use_07_metric=True, num_classes=3) -> dict:
    metric = VOCDetectionAP(use_07_metric=use_07_metric, num_classes=num_classes)
    metric.update(preds, targets)
    return metric.compute()


A, B, EMPTY = (10, 10, 49, 49), (100, 100, 139, 159), (200, 0, 239, 39)


@pytest.mark.parametrize(("use_07_metric", "expected"), [(True, (6 + 5 * 2 / 3) / 11), (False, 0.5 + 0.5 * 2 / 3)])
def test_duplicate_is_a_false_positive(use_07_metric, expected):
    # ranked: A (TP), A again (duplicate: FP), B (TP) -> recall .5 .5 1, precision 1 .5 2/3
    preds = [pred([A, A, B], [0.9, 0.8, 0.7], [0, 0, 0])]
    result = ap_of(preds, [target([A, B], [0, 0])], use_07_metric)
    assert result["ap_per_class"][0].item() == pytest.approx(expected)


def test_detecting_a_difficult_object_counts_neither_way():
    # ranked: D (difficult: ignored), A (TP), D again (ignored), nothing there (FP); one positive
    preds = [pred([B, A, B, EMPTY], [0.95, 0.9, 0.85, 0.5], [0, 0, 0, 0])]
    result = ap_of(preds, [target([A, B], [0, 0], [False, True])])
    assert result["ap_per_class"][0].item() == pytest.approx(1.0)  # 0.5 if the difficult hits were false positives
    missed = ap_of([pred([B], [0.9], [0])], [target([A, B], [0, 0], [False, True])])
    assert missed["ap_per_class"][0].item() == 0.0  # the difficult box is not a positive to find either


def test_eleven_point_interpolation():
    # ranked TP FP TP FP TP over 4 positives: recall .25 .25 .5 .5 .75, precision 1 .5 2/3 .5 .6
    # max precision at recall >= t: 1 (t = 0, .1, .2), 2/3 (.3, .4, .5), .6 (.6, .7), 0 (.8, .9, 1)
    gts = [A, B, (300, 300, 339, 339), (400, 0, 439, 39)]
    preds = [pred([A, EMPTY, B, EMPTY, gts[2]], [0.9, 0.8, 0.7, 0.6, 0.5], [1] * 5)]
    result = ap_of(preds, [target(gts, [1] * 4)])
    assert result["ap_per_class"][1].item() == pytest.approx((3 + 3 * 2 / 3 + 2 * 0.6) / 11)
    area = ap_of(preds, [target(gts, [1] * 4)], use_07_metric=False)
    assert area["ap_per_class"][1].item() == pytest.approx(0.25 + 0.25 * 2 / 3 + 0.25 * 0.6)


def test_recall_of_exactly_three_tenths_reaches_the_threshold():
    gts = [(20 * k, 0, 20 * k + 9, 9) for k in range(10)]
    preds = [pred(gts[:3], [0.9, 0.8, 0.7], [0, 0, 0])]
    result = ap_of(preds, [target(gts, [0] * 10)])
    assert result["ap_per_class"][0].item() == pytest.approx(4 / 11)  # t = 0, .1, .2, .3 have precision 1


def test_class_without_detections_scores_zero_and_class_without_positives_is_excluded():
    preds = [pred([A], [0.9], [0])]
    targets = [target([A, B, EMPTY], [0, 1, 2], [False, False, True])]
    result = ap_of(preds, targets)
    ap = result["ap_per_class"]
    assert ap[0].item() == 1.0 and ap[1].item() == 0.0  # class 1: a positive, no detection
    assert math.isnan(ap[2].item())  # class 2: only a difficult box, so AP undefined
    assert result["map"].item() == pytest.approx(0.5)  # mean over classes 0 and 1


def test_overlap_uses_the_plus_one_pixel_convention_and_must_exceed_one_half():
    gt = [target([(0, 0, 10, 10)], [0])]
    # +1 areas: 6 x 11 / (11 x 11) = 0.545 (true positive); without the +1 it would be 5 x 10 / 100 = 0.5
    assert ap_of([pred([(0, 0, 5, 10)], [1.0], [0])], gt)["ap_per_class"][0].item() == 1.0
    # +1 areas: exactly 0.5 (5 x 10 / 100) is not above 0.5
    half = [target([(0, 0, 9, 9)], [0])]
    assert ap_of([pred([(0, 0, 4, 9)], [1.0], [0])], half)["ap_per_class"][0].item() == 0.0
    assert voc_box_iou(box((0, 0, 4, 9)), box((0, 0, 9, 9))).item() == pytest.approx(0.5)


def random_dataset(seed: int, images: int = 40, num_classes: int = 4):
    """Detections scattered around ground-truth boxes (hits, near misses, duplicates, background)."""
    rng = np.random.default_rng(seed)
    preds, targets = [], []
    for _ in range(images):
        n = int(rng.integers(0, 5))
        xy = rng.uniform(0, 200, (n, 2))
        gt = np.concatenate([xy, xy + rng.uniform(10, 80, (n, 2))], 1)
        labels = rng.integers(0, num_classes, n)
        targets.append({"boxes": torch.tensor(gt, dtype=torch.float32), "labels": torch.tensor(labels), "difficult": torch.tensor(rng.random(n) < 0.2)})
        jittered = np.repeat(gt, 3, 0) + rng.normal(0, 6, (3 * n, 4))
        xy = rng.uniform(0, 200, (4, 2))
        background = np.concatenate([xy, xy + rng.uniform(10, 80, (4, 2))], 1)
        boxes = np.concatenate([jittered, background]).round()  # integer pixels, as detections usually are
        det_labels = np.concatenate([np.repeat(labels, 3), rng.integers(0, num_classes, 4)])
        det_labels = np.where(rng.random(len(det_labels)) < 0.1, rng.integers(0, num_classes, len(det_labels)), det_labels)
        preds.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.tensor(rng.random(len(boxes)), dtype=torch.float32), "labels": torch.tensor(det_labels)})
    return preds, targets


@pytest.mark.parametrize("use_07_metric", [True, False])
def test_matches_the_reference_on_random_detections(use_07_metric):
    preds, targets = random_dataset(0)
    metric = VOCDetectionAP(use_07_metric=use_07_metric, num_classes=4)
    for start in range(0, len(preds), 7):  # several updates, as batches arrive
        metric.update(preds[start : start + 7], targets[start : start + 7])
    result = metric.compute()
    expected = reference_voc_ap(preds, targets, 4, use_07_metric)
    np.testing.assert_allclose(result["ap_per_class"].numpy(), expected, rtol=1e-6)
    assert 0.1 < result["map"].item() < 0.95  # a non-trivial case
    assert result["map"].item() == pytest.approx(np.nanmean(expected), rel=1e-6)


def test_mismatched_batch_is_an_error():
    with pytest.raises(ValueError, match="2 predictions for 1 targets"):
        VOCDetectionAP().update([pred([A], [1.0], [0])] * 2, [target([A], [0])])


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    preds, targets = random_dataset(1)
    split, one_sided = VOCDetectionAP(num_classes=4), VOCDetectionAP(num_classes=4)
    split.update(preds[rank::world_size], targets[rank::world_size])  # each process sees part of the images
    if rank == 0:  # the other process sees no image at all: its empty state must still gather
        one_sided.update(preds, targets)
    torch.save({"split": split.compute(), "one_sided": one_sided.compute()}, f"{out_dir}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_syncs_across_processes(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    preds, targets = random_dataset(1)
    expected = reference_voc_ap(preds, targets, 4, True)
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for result in results.values():
            np.testing.assert_allclose(result["ap_per_class"].numpy(), expected, rtol=1e-6)


def test_exposed_as_evals_metrics_voc_detection_ap():
    from evals import metrics

    assert metrics.VOCDetectionAP is VOCDetectionAP
