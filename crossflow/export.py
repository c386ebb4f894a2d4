"""`crossflow export CHECKPOINT OUT`: a pretraining checkpoint -> backbone file (BN folded, head dropped)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from crossflow.errors import InvalidInputError, MissingInputError
from crossflow.models.backbone import save_backbone
from crossflow.module import CrossFlowPretraining


def load_pretraining_checkpoint(path: str | Path) -> CrossFlowPretraining:
    """A crossflow pretraining checkpoint -> the module in eval mode; a clear refusal for anything else."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several types for non-checkpoint files
        raise InvalidInputError(f"{path} is not a crossflow pretraining checkpoint (torch.load failed: {error})") from None
    state = checkpoint.get("state_dict", {}) if isinstance(checkpoint, dict) else {}
    if "log_sigma2" not in state or not any(k.startswith("backbone.") for k in state):
        raise InvalidInputError(f"{path} is not a crossflow pretraining checkpoint (made by `crossflow fit --config configs/pretrain/...`)")
    return CrossFlowPretraining.load_from_checkpoint(path, map_location="cpu").eval()


def export(checkpoint: str | Path, out: str | Path) -> Path:
    module = load_pretraining_checkpoint(checkpoint)
    source = {"checkpoint": str(checkpoint), "objective": module.hparams.objective, "taps": list(module.hparams.taps)}
    return save_backbone(module.backbone, out, source=source)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a pretraining checkpoint (.ckpt)")
    parser.add_argument("out", help="the backbone file to write (e.g. backbone.pt)")


def run(args: argparse.Namespace) -> int:
    path = export(args.checkpoint, args.out)
    print(f"backbone written: {path} (batch norm folded into the conv weights; load with crossflow.models.load_backbone)")
    return 0
