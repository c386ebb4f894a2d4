"""`crossflow export CHECKPOINT OUT`: a pretraining checkpoint -> backbone file (BN folded, head dropped).

Either kind of checkpoint, told apart by its content: self-supervised (:class:`CrossFlowPretraining`, the
``source.objective`` of the backbone file is its objective) or supervised (:class:`SupervisedPretraining`,
``configs/pretrain/supervised_demo.yaml``; ``source.objective`` is ``supervised``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from crossflow.checkpoints import load_checkpoint, module_from_checkpoint
from crossflow.errors import InvalidInputError
from crossflow.models.backbone import save_backbone
from crossflow.module import CrossFlowPretraining
from crossflow.supervised import is_supervised_checkpoint, supervised_from_checkpoint


def load_pretraining_checkpoint(path: str | Path) -> CrossFlowPretraining:
    """A crossflow pretraining checkpoint -> the module in eval mode; a clear refusal for anything else.

    The file is read once, with ``weights_only=True`` (:func:`crossflow.checkpoints.load_checkpoint`), and the
    module built from its plain hyper-parameters and its ``state_dict``."""
    return pretraining_from_checkpoint(path, load_checkpoint(path, "crossflow pretraining checkpoint"))


def pretraining_from_checkpoint(path: str | Path, checkpoint: dict) -> CrossFlowPretraining:
    """The content of the self-supervised checkpoint at ``path`` -> the module in eval mode (else a one-line error)."""
    state = checkpoint.get("state_dict", {})
    if "log_sigma2" not in state or not any(k.startswith("backbone.") for k in state):
        raise InvalidInputError(f"{path} is not a crossflow pretraining checkpoint (made by `crossflow fit --config configs/pretrain/...`)")
    return module_from_checkpoint(CrossFlowPretraining, checkpoint)


# Hyper-parameters that repeat a pretraining rather than change it (class paths, data paths, worker counts, seeds,
# memory layout).
NOT_SETTINGS = {"_class_path", "_instantiator", "data_dir", "root", "num_workers", "seed", "channels_last"}


def pretraining_settings(content: dict) -> dict:
    """A checkpoint's model and data hyper-parameters, less ``NOT_SETTINGS``: what makes two pretrainings of one
    objective different methods rather than repeats (``crossflow report`` gives each its own row)."""
    return {
        part: {k: v for k, v in sorted(content.get(key, {}).items()) if k not in NOT_SETTINGS}
        for part, key in (("model", "hyper_parameters"), ("data", "datamodule_hyper_parameters"))
    }


def export(checkpoint: str | Path, out: str | Path) -> Path:
    content = load_checkpoint(checkpoint, "crossflow pretraining checkpoint")
    if is_supervised_checkpoint(content):
        module = supervised_from_checkpoint(content)
        data = content.get("datamodule_hyper_parameters", {}).get("root")  # the labelled set it was trained on
        source = {"checkpoint": str(checkpoint), "objective": "supervised", "num_classes": module.hparams.num_classes, "data": data}
    else:
        module = pretraining_from_checkpoint(checkpoint, content)
        source = {"checkpoint": str(checkpoint), "objective": module.hparams.objective, "taps": list(module.hparams.taps)}
    return save_backbone(module.backbone, out, source={**source, "settings": pretraining_settings(content)})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a pretraining checkpoint (.ckpt)")
    parser.add_argument("out", help="the backbone file to write (e.g. backbone.pt)")


def run(args: argparse.Namespace) -> int:
    path = export(args.checkpoint, args.out)
    print(f"backbone written: {path} (batch norm folded into the conv weights; load with crossflow.models.load_backbone)")
    return 0
