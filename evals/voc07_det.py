"""PASCAL VOC2007 detection with Fast R-CNN fine-tuning of the backbone (the paper's Table 1, col. 5).

Protocol (paper sec. 4.5, following Kraehenbuehl et al.'s guidelines [41]): 150k SGD iterations,
lr 0.002 divided by 10 every 50k, momentum 0.9, weight decay 5e-4, trained on VOC2007 trainval,
tested on VOC2007 test, multi-scale training and single-scale testing. The rest is Fast R-CNN's
(Girshick 2015, its CaffeNet recipe and ``config.py``): 2 images x 128 RoIs per minibatch, 25%
foreground (IoU >= 0.5), background IoU in [0.1, 0.5), horizontal flip, training scales
(480, 576, 688, 864, 1200) with the longer side <= 2000 (its multi-scale setting), testing at 600
with the longer side <= 1000, biases at 2x lr without weight decay, difficult objects left out of
training, score threshold 0.05, per-class NMS 0.3, at most 100 detections per image, selective
search ("fast") proposals, at most 2000 per image. The metric is VOC2007's 11-point AP
(:class:`evals.det_metrics.VOCDetectionAP`).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from crossflow.models.backbone import IMAGE_MEAN, IMAGE_STD
from evals.common import BackboneProvenance, EvalDataModule, backbone_from_spec, setup_backbone, write_results
from evals.det_metrics import VOCDetectionAP
from evals.fast_rcnn import FastRCNN, detect, fast_rcnn_loss, sample_rois
from evals.overlays import OverlayCollector, detection_comparison
from evals.proposals import ProposalStore
from evals.voc import VOC_CLASSES, VOCAnnotation, parse_annotation, read_image_set, read_rgb, year_dir


def image_scale(height: int, width: int, target: int, max_size: int) -> float:
    """Fast R-CNN's resize factor: shorter side to ``target`` unless the longer side would exceed ``max_size``."""
    scale = target / min(height, width)
    if round(scale * max(height, width)) > max_size:
        scale = max_size / max(height, width)
    return scale


def flip_boxes(boxes: Tensor, width: int) -> Tensor:
    """Mirror inclusive-end boxes ``[N, 4]`` in an image ``width`` pixels wide."""
    return torch.stack([width - 1 - boxes[:, 2], boxes[:, 1], width - 1 - boxes[:, 0], boxes[:, 3]], dim=1)


class VOCDetectionDataset(Dataset):
    """VOC images with their objects and proposals, resized (and for training mirrored) as Fast R-CNN does.

    Item: ``{"image": [3, h, w] normalised, "proposals": [P, 4], "boxes": [G, 4], "labels": [G] (0..19),
    "difficult": [G] bool, "scale": float, "image_id": str, "size": (H, W) before resizing}``, boxes in the resized image's pixels (0-based,
    inclusive ends). A training item draws its shorter side from ``scales`` and flips with probability 1/2.
    """

    def __init__(self, voc_dir: Path, annotations: list[VOCAnnotation], proposals: ProposalStore, scales: tuple[int, ...], max_size: int, train: bool, flip: bool = True):
        self.voc_dir, self.annotations, self.proposals = Path(voc_dir), annotations, proposals
        self.scales, self.max_size, self.train, self.flip = list(scales), max_size, train, flip

    def __len__(self) -> int:
        return len(self.annotations)

    def __getitem__(self, index: int) -> dict:
        annotation = self.annotations[index]
        image = read_rgb(self.voc_dir / "JPEGImages" / annotation.filename)
        height, width = image.shape[:2]
        proposals = self.proposals.load(annotation.image_id)
        boxes = torch.tensor([o.box for o in annotation.objects], dtype=torch.float32).reshape(-1, 4) - 1  # VOC is 1-based
        if self.train and self.flip and torch.rand(()) < 0.5:
            image, proposals, boxes = image[:, ::-1], flip_boxes(proposals, width), flip_boxes(boxes, width)
        target = self.scales[int(torch.randint(len(self.scales), ()))] if self.train else self.scales[0]
        scale = image_scale(height, width, target, self.max_size)
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
        pixels = torch.from_numpy(image).permute(2, 0, 1).float().div(255)
        pixels = (pixels - torch.tensor(IMAGE_MEAN).view(3, 1, 1)) / torch.tensor(IMAGE_STD).view(3, 1, 1)
        return {
            "image": pixels, "proposals": proposals * scale, "boxes": boxes * scale, "scale": scale, "image_id": annotation.image_id,
            "size": (height, width),
            "labels": torch.tensor([o.label for o in annotation.objects], dtype=torch.long),
            "difficult": torch.tensor([o.difficult for o in annotation.objects], dtype=torch.bool),
        }


def batch_rois(boxes: list[Tensor]) -> Tensor:
    """Per-image boxes ``[R_i, 4]`` -> RoIs ``[sum R_i, 5]`` (image index, x1, y1, x2, y2)."""
    return torch.cat([torch.cat([b.new_full((len(b), 1), i), b], dim=1) for i, b in enumerate(boxes)])


def collate_detection(items: list[dict]) -> dict:
    """Items -> ``{"images": [B, 3, H, W] zero-padded at the bottom/right, "items": the items without their image}``."""
    height = max(item["image"].shape[1] for item in items)
    width = max(item["image"].shape[2] for item in items)
    images = items[0]["image"].new_zeros(len(items), 3, height, width)
    for image, item in zip(images, items):
        image[:, : item["image"].shape[1], : item["image"].shape[2]] = item["image"]
    return {"images": images, "items": [{k: v for k, v in item.items() if k != "image"} for item in items]}


class VOC07DetectionData(EvalDataModule):
    """VOC2007 ``train_split`` for fit, ``test_split`` for test, with cached proposals.

    ``root``: a folder holding ``VOCdevkit/VOC2007`` (or that folder itself).
    ``proposal_dir``: per-image proposal files (format in :mod:`evals.proposals`); default
    ``<VOC2007>/Proposals/selective_search_<mode>``. ``compute_proposals``: compute missing ones by
    selective search in ``prepare_data`` with ``proposal_workers`` processes (else missing ones are an error).
    """

    def __init__(
        self,
        root: str = "data/voc",
        train_split: str = "trainval",
        test_split: str = "test",
        train_scales: tuple[int, ...] = (480, 576, 688, 864, 1200),
        train_max_size: int = 2000,
        test_scale: int = 600,
        test_max_size: int = 1000,
        flip: bool = True,
        images_per_batch: int = 2,
        test_batch_size: int = 1,
        num_workers: int = 4,
        proposal_dir: str | None = None,
        compute_proposals: bool = True,
        proposal_mode: str = "fast",
        proposal_workers: int = 4,
        max_proposals: int = 2000,
        min_proposal_size: float = 20,
    ):
        super().__init__()
        self.save_hyperparameters()

    @property
    def voc_dir(self) -> Path:
        return year_dir(self.hparams.root, "2007")

    def proposal_store(self) -> ProposalStore:
        h = self.hparams
        folder = h.proposal_dir or self.voc_dir / "Proposals" / f"selective_search_{h.proposal_mode}"
        return ProposalStore(folder, h.compute_proposals, h.proposal_mode, h.max_proposals, h.min_proposal_size)

    def annotations(self, split: str) -> list[VOCAnnotation]:
        return [parse_annotation(self.voc_dir / "Annotations" / f"{i}.xml") for i in read_image_set(self.voc_dir, split, "Main")]

    def prepare_data(self) -> None:
        """Proposals for every image of both splits (computed once, resumable)."""
        ids = {i for split in (self.hparams.train_split, self.hparams.test_split) for i in read_image_set(self.voc_dir, split, "Main")}
        images = {i: self.voc_dir / "JPEGImages" / f"{i}.jpg" for i in sorted(ids)}
        self.proposal_store().prepare(images, self.hparams.proposal_workers)

    def setup(self, stage: str) -> None:
        h, store = self.hparams, self.proposal_store()
        if stage == "fit":
            trainable = [a for a in self.annotations(h.train_split) if any(not o.difficult for o in a.objects)]
            self.train_set = VOCDetectionDataset(self.voc_dir, trainable, store, h.train_scales, h.train_max_size, True, h.flip)
        if stage == "test":
            self.test_set = VOCDetectionDataset(self.voc_dir, self.annotations(h.test_split), store, [h.test_scale], h.test_max_size, False)

    def train_dataloader(self) -> DataLoader:
        return self.train_loader(self.train_set, self.hparams.images_per_batch, collate_detection)

    def test_dataloader(self) -> DataLoader:
        return self.eval_loader(self.test_set, self.hparams.test_batch_size, collate_detection)


class VOC07Detection(BackboneProvenance, L.LightningModule):
    """Fast R-CNN fine-tuning of the backbone; tests with VOC2007's detection AP.

    Args:
        backbone: a backbone file (crossflow export or torchvision AlexNet), "random" or "random-rescaled".
        rebalance: re-balance the backbone before fine-tuning (Kraehenbuehl et al.'s between-layer step alone, as
            magic_init does to a trained network; :func:`evals.common.setup_backbone`). The paper reports without it.
        train_conv1: whether conv1 is fine-tuned (Fast R-CNN froze it for CaffeNet).
        dropout: after fc6 and fc7.
        lr, momentum, weight_decay, lr_step, lr_gamma: SGD, lr times ``lr_gamma`` every ``lr_step`` iterations.
        bias_lr_mult: biases train at this multiple of lr, without weight decay (Fast R-CNN's prototxt).
        rois_per_image, fg_fraction, fg_iou, bg_iou_low, bg_iou_high: RoI sampling (:func:`sample_rois`).
        score_thresh, nms_iou, detections_per_image: test-time detection (:func:`detect`).
        use_07_metric: 11-point AP (VOC2007) or area under the curve (VOC2010+).
    """

    def __init__(
        self,
        backbone: str = "random",
        rebalance: bool = False,
        train_conv1: bool = True,
        dropout: float = 0.5,
        lr: float = 0.002,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        lr_step: int = 50000,
        lr_gamma: float = 0.1,
        bias_lr_mult: float = 2.0,
        rois_per_image: int = 128,
        fg_fraction: float = 0.25,
        fg_iou: float = 0.5,
        bg_iou_low: float = 0.1,
        bg_iou_high: float = 0.5,
        score_thresh: float = 0.05,
        nms_iou: float = 0.3,
        detections_per_image: int = 100,
        use_07_metric: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.network = FastRCNN(backbone_from_spec(backbone), len(VOC_CLASSES) + 1, dropout, train_conv1)
        self.test_ap = VOCDetectionAP(use_07_metric, len(VOC_CLASSES))
        self.overlays = OverlayCollector("test/detections")  # a few test images, ground truth | detections, to W&B

    def setup(self, stage: str) -> None:
        setup_backbone(self, self.network.backbone, stage)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        h, rois, labels, targets = self.hparams, [], [], []
        for item in batch["items"]:
            kept = ~item["difficult"]
            boxes, item_labels, item_targets = sample_rois(
                item["proposals"], item["boxes"][kept], item["labels"][kept] + 1,
                h.rois_per_image, h.fg_fraction, h.fg_iou, (h.bg_iou_low, h.bg_iou_high),
            )
            rois.append(boxes)
            labels.append(item_labels)
            targets.append(item_targets)
        labels = torch.cat(labels)
        logits, deltas = self.network(batch["images"], batch_rois(rois))
        loss_cls, loss_box = fast_rcnn_loss(logits, deltas, labels, torch.cat(targets))
        self.log_dict({"train/loss_cls": loss_cls, "train/loss_box": loss_box, "train/accuracy": (logits.argmax(1) == labels).float().mean()})
        self.log("train/loss", loss_cls + loss_box, prog_bar=True)
        return loss_cls + loss_box

    def test_step(self, batch: dict, batch_idx: int) -> None:
        h, items = self.hparams, batch["items"]
        logits, deltas = self.network(batch["images"], batch_rois([item["proposals"] for item in items]))
        counts = [len(item["proposals"]) for item in items]
        preds, targets = [], []
        for item, item_logits, item_deltas in zip(items, logits.split(counts), deltas.split(counts)):
            height, width = item["size"]
            preds.append(detect(item_logits, item_deltas, item["proposals"] / item["scale"], height, width, h.score_thresh, h.nms_iou, h.detections_per_image))
            targets.append({"boxes": item["boxes"] / item["scale"], "labels": item["labels"], "difficult": item["difficult"]})
        self.test_ap.update(preds, targets)
        for image, item, pred in zip(batch["images"], items, preds):
            self.overlays.add(lambda: detection_comparison(image, item, pred, item["scale"]), item["image_id"])

    def on_test_epoch_end(self) -> None:
        result = self.test_ap.compute()
        self.test_ap.reset()
        self.overlays.log(self.trainer)
        self.log("test/mAP", result["map"])
        ap = {name: value for name, value in zip(VOC_CLASSES, result["ap_per_class"].tolist()) if value == value}  # NaN: no positives
        write_results(self, "voc07_det", {"mAP": result["map"].item()}, {"AP": ap})

    def configure_optimizers(self):
        h = self.hparams
        trained = [(name, p) for name, p in self.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for name, p in trained if not name.endswith("bias")], "lr": h.lr, "weight_decay": h.weight_decay},
            {"params": [p for name, p in trained if name.endswith("bias")], "lr": h.lr * h.bias_lr_mult, "weight_decay": 0.0},
        ]
        optimizer = torch.optim.SGD(groups, lr=h.lr, momentum=h.momentum, fused=True)  # one kernel: AlexNet's 57M in 28 ms, not 133 (CPU)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, h.lr_step, h.lr_gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
