"""What every transfer evaluation shares: the backbone argument and the results file."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import lightning as L

from crossflow.models import load_backbone
from crossflow.models.alexnet import AlexNet
from crossflow.models.backbone import file_sha256

RANDOM_BACKBONE = "random"


def backbone_from_spec(spec: str | None) -> AlexNet:
    """``"random"`` (or None) -> the random initialisation; otherwise an exported backbone file."""
    return load_backbone(None if spec in (None, RANDOM_BACKBONE) else spec)


def backbone_identity(spec: str | None) -> dict:
    """What results.json records about the backbone: its path and the file's SHA-256."""
    if spec in (None, RANDOM_BACKBONE):
        return {"backbone": RANDOM_BACKBONE, "backbone_sha256": None}
    return {"backbone": str(spec), "backbone_sha256": file_sha256(spec)}


def write_results(trainer: L.Trainer, benchmark: str, metrics: dict, per_class: dict, backbone: str | None, config: dict) -> Path:
    """Write ``<default_root_dir>/results.json`` atomically (rank 0 only) and log it to W&B when that is the logger.

    Returns the path. ``metrics`` maps names to floats; ``per_class`` maps metric names to {class: value}.
    """
    path = Path(trainer.default_root_dir) / "results.json"
    per_class = {metric: {k: _json_number(v) for k, v in values.items()} for metric, values in per_class.items()}
    record = {"benchmark": benchmark, "metrics": metrics, "per_class": per_class, **backbone_identity(backbone), "config": config}
    if trainer.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(record, indent=2, default=str))
        os.replace(partial, path)
        log_per_class_tables(trainer, per_class)
    return path


def _json_number(value) -> float | None:
    """NaN (e.g. the IU of a class absent from the set) becomes JSON null: strict parsers reject NaN."""
    value = float(value)
    return None if math.isnan(value) else value


def log_per_class_tables(trainer: L.Trainer, per_class: dict) -> None:
    """Per-class values as W&B bar charts, for each W&B logger of the trainer."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if not isinstance(logger, WandbLogger):
            continue
        import wandb

        for metric, values in per_class.items():
            rows = [[name, value] for name, value in values.items() if value is not None]
            table = wandb.Table(data=rows, columns=["class", metric])
            logger.experiment.log({f"per_class/{metric}": wandb.plot.bar(table, "class", metric, title=metric)})
