"""`crossflow summary RUN_DIR`: what a pretraining run learned, in a few lines.

Compares the network as initialised (``checkpoints/init.ckpt``) with the best one
(``checkpoints/best.ckpt``):

- validation loss, and the loss minus the entropy of the flow target S_f (the loss stays
  near log N because both kernels are flat; its excess over the target's entropy is what falls);
- the learned sigma^2;
- object-grouping ROC AUC: cosine similarity of the embeddings of two pixels of one frame as a
  score for "same object instance", over pixel pairs of held-out synthetic frames (rendered
  with seeds that no training clip uses) with their instance masks.

The initial network's batch-norm statistics are re-estimated on training batches first, so
both networks are evaluated as they would be exported. Writes ``RUN_DIR/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import cv2
import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc

from crossflow.checkpoints import init_arguments, load_checkpoint
from crossflow.data.pairs import PairDataModule
from crossflow.data.render import render_clip
from crossflow.errors import MissingInputError
from crossflow.export import load_pretraining_checkpoint
from crossflow.losses import cross_pixel_similarity_loss, flow_target_entropy
from crossflow.models.backbone import IMAGE_MEAN, IMAGE_STD
from crossflow.module import CrossFlowPretraining

HELD_OUT_SEED = 1_000_000  # synthetic clip seeds from here on are never used by `make pretrain`


def datamodule_of(checkpoint: Path) -> PairDataModule:
    hparams = load_checkpoint(checkpoint)["datamodule_hyper_parameters"]
    return PairDataModule(**{**init_arguments(hparams), "num_workers": 0, "augment_on_device": False})  # CPU batches


@torch.no_grad()
def recalibrate_batch_norm(module: CrossFlowPretraining, batches: list[dict]) -> None:
    """Re-estimate BN running statistics as cumulative averages over ``batches``."""
    norms = [m for m in module.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    module.train()
    for batch in batches:
        module.backbone_taps(batch["image"])
    module.eval()


@torch.no_grad()
def validation_loss(module: CrossFlowPretraining, batches: list[dict]) -> tuple[float, float]:
    """Mean validation loss and mean (loss - entropy of S_f) over ``batches`` (cross-pixel objective)."""
    losses, excess = [], []
    for batch in batches:
        loss = cross_pixel_similarity_loss(module(batch["image"], batch["points"]), batch["flow"], module.sigma2)
        losses.append(loss.item())
        excess.append(loss.item() - flow_target_entropy(batch["flow"], module.sigma2).item())
    return float(np.mean(losses)), float(np.mean(excess))


def training_world(data_dir: str | Path) -> str:
    """The synthetic world (:data:`crossflow.data.render.WORLDS`) whose videos the prepared ``data_dir`` was made
    from, read from the ``synth.json`` of its inputs; ``default`` for real videos (or when no input is left)."""
    settings = Path(data_dir) / "settings.json"
    inputs = json.loads(settings.read_text())["settings"]["inputs"] if settings.is_file() else []
    worlds = {json.loads(m.read_text()).get("world", "default") for m in (Path(i) / "synth.json" for i in inputs) if m.is_file()}
    return worlds.pop() if len(worlds) == 1 else "default"


def held_out_frames(num_clips: int, frames_per_clip: int, short_side: int, world: str = "default") -> list[tuple[torch.Tensor, np.ndarray]]:
    """``(image [1, 3, h, w] normalised, instances [h, w])`` from synthetic clips of ``world`` no training run saw."""
    frames = []
    for index in range(num_clips):
        clip = render_clip(HELD_OUT_SEED + index, world=world)
        for t in np.linspace(0, len(clip.frames) - 1, frames_per_clip).astype(int):
            frame, instances = clip.frames[t], clip.instances[t]
            scale = short_side / min(frame.shape[:2])
            size = (round(frame.shape[1] * scale), round(frame.shape[0] * scale))
            frame = cv2.resize(frame, size, interpolation=cv2.INTER_LINEAR)
            instances = cv2.resize(instances.astype(np.int32), size, interpolation=cv2.INTER_NEAREST)
            image = torch.from_numpy(frame).permute(2, 0, 1).float() / 255
            image = (image - torch.tensor(IMAGE_MEAN).view(3, 1, 1)) / torch.tensor(IMAGE_STD).view(3, 1, 1)
            frames.append((image.unsqueeze(0), instances))
    return frames


@torch.no_grad()
def grouping_auc(module: CrossFlowPretraining, frames: list, points_per_frame: int = 256, seed: int = 0) -> float:
    """ROC AUC of embedding cosine similarity for "same instance" over pixel pairs within each frame."""
    rng = np.random.default_rng(seed)
    scores, labels = [], []
    for image, instances in frames:
        height, width = instances.shape
        xs, ys = rng.integers(0, width, points_per_frame), rng.integers(0, height, points_per_frame)
        points = torch.from_numpy(np.stack([xs, ys], -1)).float().unsqueeze(0)
        embedding = torch.nn.functional.normalize(module(image, points)[0].flatten(1), dim=-1)
        pairs = torch.triu_indices(points_per_frame, points_per_frame, offset=1)
        scores.append((embedding @ embedding.T)[pairs[0], pairs[1]])
        instance = torch.from_numpy(instances[ys, xs])
        labels.append((instance[pairs[0]] == instance[pairs[1]]).long())
    return binary_auroc(torch.cat(scores), torch.cat(labels)).item()


def summarise(run_dir: Path, calibration_batches: int = 4, num_clips: int = 6, frames_per_clip: int = 4) -> dict:
    checkpoints = run_dir / "checkpoints"
    init_path, best_path = checkpoints / "init.ckpt", checkpoints / "best.ckpt"
    for path in (init_path, best_path):
        if not path.is_file():
            raise MissingInputError(f"{path} not found: is {run_dir} a finished `crossflow fit` run of configs/pretrain/?")
    datamodule = datamodule_of(best_path)
    datamodule.setup("fit")
    train_batches = [b for b, _ in zip(datamodule.train_dataloader(), range(calibration_batches)) if b is not None]
    val_batches = [b for b in datamodule.val_dataloader() if b is not None]
    world = training_world(datamodule.hparams.data_dir)
    frames = held_out_frames(num_clips, frames_per_clip, datamodule.hparams.crop_size, world)
    initial, trained = load_pretraining_checkpoint(init_path), load_pretraining_checkpoint(best_path)
    recalibrate_batch_norm(initial, train_batches)
    summary = {
        "run": str(run_dir),
        "checkpoint": str(best_path),
        "step": load_checkpoint(best_path)["global_step"],
        "backbone": str(run_dir / "backbone.pt"),
        "wandb_runs": sorted(str(p) for p in (run_dir / "wandb").glob("offline-run-*")),
        "objective": trained.hparams.objective,
        "points_per_image": datamodule.hparams.num_points,
        "grouping_auc": {"initial": grouping_auc(initial, frames), "trained": grouping_auc(trained, frames)},
        "grouping_frames": len(frames),
        "grouping_world": world,
    }
    if trained.hparams.objective == "cross_pixel":
        summary["val_loss"] = dict(zip(("initial", "trained"), (validation_loss(m, val_batches) for m in (initial, trained))))
        summary["sigma2"] = {"initial": initial.sigma2.item(), "trained": trained.sigma2.item()}
    return summary


def format_summary(s: dict) -> str:
    lines = [
        "",
        "== crossflow pretraining summary ==",
        f"run              {s['run']}",
        f"checkpoint       {s['checkpoint']} (step {s['step']})",
        f"backbone         {s['backbone']} (BN folded; use it with `make eval-... BACKBONE=...`)",
    ]
    for wandb_run in s["wandb_runs"][-1:]:
        lines.append(f"W&B offline run  {wandb_run} (upload: wandb sync {wandb_run})")
    if "val_loss" in s:
        (l0, e0), (l1, e1) = s["val_loss"]["initial"], s["val_loss"]["trained"]
        lines += [
            f"val loss         {l0:.4f} -> {l1:.4f}   (log N = {math.log(s['points_per_image']):.4f}: both kernels are flat)",
            f"  minus H(S_f)   {e0:.4f} -> {e1:.4f}   (the part the network can reduce)",
            f"sigma^2          {s['sigma2']['initial']:.5f} -> {s['sigma2']['trained']:.5f}",
        ]
    auc = s["grouping_auc"]
    lines.append(
        f"grouping AUC     {auc['initial']:.3f} (random init) -> {auc['trained']:.3f} (trained)   "
        f"[same-instance pixel pairs, {s['grouping_frames']} held-out synthetic frames, {s['grouping_world']} world]"
    )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a pretraining run folder (trainer.default_root_dir), e.g. runs/pretrain/demo")


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    summary = summarise(run_dir)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_summary(summary))
    return 0
