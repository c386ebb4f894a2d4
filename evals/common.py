"""What every transfer evaluation shares: the backbone argument, its rescaling, the data modules' loaders, and the
results file.

The backbone argument (``--model.init_args.backbone SPEC``) of every eval is one of

- ``random``: our AlexNet at its random initialisation (the paper's "Random" row);
- ``random-rescaled``: the same, rescaled by Kraehenbuehl et al.'s data-dependent procedure
  (:mod:`crossflow.models.rescale`) on the eval's own training images when fitting starts
  (:func:`setup_backbone`; the "Random-rescaled" row);
- a file: a crossflow backbone (``crossflow export``) or torchvision's ImageNet AlexNet
  ``state_dict`` (e.g. ``alexnet-owt-7be5be79.pth``, the "Class Labels" row), see
  :func:`crossflow.models.load_backbone`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from crossflow.data.resumable import ResumableLoader, run_seed
from crossflow.errors import InvalidInputError
from crossflow.files import write_text_atomic
from crossflow.models import load_backbone
from crossflow.models.alexnet import CONV_LAYERS, AlexNet
from crossflow.models.backbone import file_sha256, read_backbone_file
from crossflow.models.rescale import data_dependent_rescale, rebalance, rescale_within_layers

RANDOM_BACKBONE = "random"
RESCALED_BACKBONE = "random-rescaled"
RESCALE_IMAGES = 160  # magic_init's example: 10 batches of 16 images
RESCALE_SEED = 0
PROVENANCE_KEY = "crossflow_backbone"  # where checkpoints keep the fitted backbone's identity


def backbone_from_spec(spec: str | None) -> AlexNet:
    """``"random"``, ``"random-rescaled"`` (or None) -> the random initialisation (the rescaling happens in
    :func:`setup_backbone`); otherwise a backbone file (crossflow or torchvision format)."""
    return load_backbone(None if spec in (None, RANDOM_BACKBONE, RESCALED_BACKBONE) else spec)


def backbone_identity(spec: str | None) -> dict:
    """What results.json records about the backbone: ``backbone`` (the spec: ``random``, ``random-rescaled`` or
    the file's path), ``backbone_kind`` (``random``, ``random-rescaled``, ``crossflow`` or ``torchvision``: which
    of those it is, a file's kind read from its content), ``backbone_source`` (what a crossflow file was exported
    from: checkpoint, objective, taps) and ``backbone_sha256`` (a file's SHA-256, else None)."""
    if spec in (None, RANDOM_BACKBONE, RESCALED_BACKBONE):
        spec = spec or RANDOM_BACKBONE
        return {"backbone": spec, "backbone_kind": spec, "backbone_source": {}, "backbone_sha256": None}
    kind, content = read_backbone_file(spec)
    source = content.get("source", {}) if kind == "crossflow" else {}  # checkpoint, objective, taps
    return {"backbone": str(spec), "backbone_kind": kind, "backbone_source": source, "backbone_sha256": file_sha256(spec)}


class BackboneProvenance:
    """Mixin of the eval LightningModules: which backbone the fine-tuned weights started from.

    Its identity (:func:`backbone_identity`) is taken when fitting starts (by rank 0, which writes the checkpoints),
    stored in every checkpoint and read back when one is loaded (``test --ckpt_path``, a resumed fit), so results.json names the backbone that was
    fine-tuned even when the file at that path has since been replaced (a re-export, say), with a warning.
    (LightningCLI takes the model arguments, ``backbone`` included, from the checkpoint itself.)
    """

    fitted_backbone: dict | None = None

    def backbone_record(self) -> dict:
        """What results.json records about the backbone: the fitted one, else the one named (an untrained test)."""
        return self.fitted_backbone or backbone_identity(self.hparams.backbone)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[PROVENANCE_KEY] = self.fitted_backbone

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        fitted = checkpoint.get(PROVENANCE_KEY)
        if fitted is None:
            return  # a checkpoint from before provenance was recorded
        self.fitted_backbone = fitted
        if rank_zero_only.rank == 0 and fitted["backbone_sha256"] is not None:  # a file: has it changed since?
            now = file_sha256(self.hparams.backbone)
            if now != fitted["backbone_sha256"]:
                rank_zero_warn(
                    f"{self.hparams.backbone} is not the backbone this checkpoint was fine-tuned from (sha256 "
                    f"{fitted['backbone_sha256']}, now {now}); the weights come from the checkpoint and results.json records the fine-tuned one"
                )


class EvalDataModule(L.LightningDataModule):
    """The base of every eval's data module (its ``setup`` builds the datasets, its hyper-parameters include
    ``num_workers``): the training loader that a checkpoint resumes mid-epoch and the plain evaluation loader."""

    def train_loader(self, dataset: Dataset, batch_size: int, collate_fn=None) -> ResumableLoader:
        """Shuffled full batches whose order and augmentation are a function of (seed, epoch, item)
        (:class:`crossflow.data.resumable.ResumableLoader`): a resumed fit sees what an uninterrupted one saw."""
        workers = self.hparams.num_workers
        return ResumableLoader(dataset, batch_size, run_seed(), self.trainer, seed_items=True, drop_last=True,
                               collate_fn=collate_fn, num_workers=workers, persistent_workers=workers > 0)

    def eval_loader(self, dataset: Dataset, batch_size: int, collate_fn=None) -> DataLoader:
        """Every item once, in order."""
        return DataLoader(dataset, batch_size, collate_fn=collate_fn, num_workers=self.hparams.num_workers)


def setup_backbone(module: L.LightningModule, network: AlexNet, stage: str) -> None:
    """Every eval's ``setup`` step: when fitting starts, note the backbone's identity (:class:`BackboneProvenance`)
    and rescale ``network`` in place where its layers were never trained:

    - ``backbone: random-rescaled``: every layer, within-layer then between-layer (Kraehenbuehl et al.);
    - a backbone file with ``untrained_layers`` (layers its pretraining never ran, e.g. fc6/fc7 of a 128 px
      demo pretraining): those layers, within-layer (Algorithm 1: each channel's pre-activation standardised on
      the images, the trained layers below them as they are), so that no row carries unscaled random layers;
    - ``random`` and every trained layer: nothing;
    - with the eval's ``rebalance: true``, then the between-layer step over every layer the images reach
      (Kraehenbuehl et al.'s "re-balancing" of a trained network, :func:`crossflow.models.rescale.rebalance`; the
      paper reports its results without it). ``random-rescaled`` has it anyway.

    The images are :func:`training_images` of the datamodule's training set (``RESCALE_IMAGES`` of them, with
    the eval's own augmentation and crop size, fixed by ``RESCALE_SEED``). The rescaling happens at no other
    stage: at ``test`` (or when a fit resumes) the fitted weights come from the checkpoint, which Lightning
    loads after ``setup``. DDP ranks compute the same weights (and DDP broadcasts rank 0's anyway).
    """
    spec, rebalanced = module.hparams.backbone, module.hparams.get("rebalance", False)
    if stage == "fit" and module.fitted_backbone is None and module.trainer.is_global_zero:  # rank 0 writes checkpoints
        module.fitted_backbone = backbone_identity(spec)
    untrained = list(CONV_LAYERS) if spec == RESCALED_BACKBONE else file_untrained_layers(spec)
    if stage != "fit" or not (untrained or rebalanced):
        return
    datamodule = module.trainer.datamodule
    if datamodule is None:
        raise InvalidInputError(f"backbone {spec} needs a datamodule: its training images fit its rescaling")
    images = training_images(datamodule.train_dataloader().dataset, RESCALE_IMAGES, RESCALE_SEED)
    layers = rescale_untrained_layers(network, spec, images, rebalanced)
    if untrained:
        how = "(Kraehenbuehl et al.)" if spec == RESCALED_BACKBONE else "within-layer, never trained by its pretraining"
        unreached = [name for name in untrained if name not in layers]
        left = f"; {', '.join(unreached)} left at the random initialisation (the images are too small for them)" if unreached else ""
        rank_zero_info(f"{spec}: {', '.join(layers) or 'no layer'} rescaled {how} on {len(images)} training images{left}")
    if rebalanced and spec != RESCALED_BACKBONE:
        rank_zero_info(f"{spec}: re-balanced (Kraehenbuehl et al.'s between-layer step) on {len(images)} training images")


def rescale_untrained_layers(network: AlexNet, spec: str | None, images: Sequence[Tensor], rebalanced: bool = False) -> list[str]:
    """The rule of :func:`setup_backbone` on ``network`` in place, with ``images``: ``random-rescaled`` gets
    Kraehenbuehl et al.'s within- and between-layer steps on every layer, a backbone file the within-layer step on
    its ``untrained_layers``, anything else nothing; then, if ``rebalanced``, every other backbone the between-layer
    step on every layer the images reach. Returns the layers rescaled within-layer."""
    if spec == RESCALED_BACKBONE:
        return data_dependent_rescale(network, images, RESCALE_SEED)
    untrained = file_untrained_layers(spec)
    layers = rescale_within_layers(network, images, only=untrained) if untrained else []
    if rebalanced:
        rebalance(network, images, seed=RESCALE_SEED)
    return layers


def file_untrained_layers(spec: str | None) -> list[str]:
    """The ``untrained_layers`` a crossflow backbone file records (none for ``random``, torchvision files and files
    exported before they were recorded)."""
    if spec in (None, RANDOM_BACKBONE, RESCALED_BACKBONE):
        return []
    kind, content = read_backbone_file(spec)
    return list(content.get("untrained_layers", [])) if kind == "crossflow" else []


def training_images(dataset: Sequence, count: int, seed: int) -> list[Tensor]:
    """``count`` training inputs ``[3, H, W]`` as the eval trains on them: items ``order[i mod n]`` of a seeded
    permutation of the dataset (an item drawn again gets new augmentation when ``count > n``), each through the
    dataset's own transforms under ``torch.manual_seed(seed)``; the global RNG state is restored afterwards."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [item_image(dataset[order[i % len(order)]]) for i in range(count)]


def item_image(item) -> Tensor:
    """The network input of a training item: a dict's ``"image"`` (detection) or a tuple's first element."""
    return item["image"] if isinstance(item, Mapping) else item[0]


def write_results(module: L.LightningModule, benchmark: str, metrics: dict, per_class: dict) -> Path:
    """Write ``<default_root_dir>/results.json`` atomically (rank 0 only) and log it to W&B when that is the logger.

    Returns the path. ``metrics`` maps names to floats; ``per_class`` maps metric names to {class: value}. The record
    adds the backbone (``module``'s :meth:`BackboneProvenance.backbone_record`), the seed and the model and data settings.
    """
    trainer = module.trainer
    datamodule = getattr(trainer, "datamodule", None)
    config = {"model": dict(module.hparams), "data": dict(datamodule.hparams) if datamodule is not None else {}}
    path = Path(trainer.default_root_dir) / "results.json"
    if trainer.is_global_zero:
        per_class = {metric: {k: _json_number(v) for k, v in values.items()} for metric, values in per_class.items()}
        seed = os.environ.get("PL_GLOBAL_SEED")  # set by seed_everything
        record = {
            "benchmark": benchmark, "metrics": metrics, "per_class": per_class, **module.backbone_record(),
            "seed": None if seed is None else int(seed), "config": config,
        }
        write_text_atomic(path, json.dumps(record, indent=2, default=str))
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
