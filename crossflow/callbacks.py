"""Training callbacks of the pretraining configs."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn

from crossflow.visualize import choose_pixels, frame_panels


class InitialCheckpoint(L.Callback):
    """Saves the network as initialised, before the first step, as ``dirpath/init.ckpt``:
    the "same network at random initialisation" that `crossflow summary` compares against."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0 and not trainer.fast_dev_run:
            trainer.save_checkpoint(self.dirpath / "init.ckpt")


class EmbeddingPanels(L.Callback):
    """Logs pictures of fixed validation frames to W&B before the first step and every ``every_n_steps`` steps.

    ``panels/embedding``: frame | flow | embedding projected to RGB (or predicted flow for the flow-classification
    baseline); ``panels/kernels``: K_f(p, .) and K_phi(p, .) at ``num_pixels`` fixed pixels p per frame (see
    :func:`crossflow.visualize.frame_panels`). The frames are the first ``num_frames`` validation samples with
    their whole flow field, taken once. Logs nothing without a WandbLogger (so also under fast_dev_run, whose
    logger is a dummy) and on processes other than rank 0.
    """

    def __init__(self, every_n_steps: int = 1000, num_frames: int = 4, num_pixels: int = 3, seed: int = 0):
        self.every_n_steps, self.num_frames, self.num_pixels, self.seed = every_n_steps, num_frames, num_pixels, seed
        self.frames: list[tuple] | None = None  # (key, frame, flow, pixels)
        self.max_magnitude = 56.0
        self.logged_step: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.log_panels(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.log_panels(trainer, pl_module)

    def log_panels(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if not loggers or not trainer.is_global_zero or trainer.global_step == self.logged_step:
            return
        self.logged_step = trainer.global_step
        frames = self.validation_frames(trainer)
        if not frames:
            return
        was_training = pl_module.training
        pl_module.eval()
        try:
            panels = [frame_panels(pl_module, frame, flow, pixels, self.max_magnitude, self.seed) for _, frame, flow, pixels in frames]
        finally:
            pl_module.train(was_training)
        keys = [key for key, *_ in frames]
        for logger in loggers:
            logger.log_image("panels/embedding", [p.permute(1, 2, 0).numpy() for p, _ in panels], step=trainer.global_step, caption=keys)
            if panels[0][1] is not None:
                logger.log_image("panels/kernels", [k.permute(1, 2, 0).numpy() for _, k in panels], step=trainer.global_step, caption=keys)

    def validation_frames(self, trainer: L.Trainer) -> list[tuple]:
        """The first ``num_frames`` validation samples with dense flow, and their pixels (taken on the first call)."""
        if self.frames is None:
            loader = trainer.val_dataloaders or (trainer.datamodule.val_dataloader() if trainer.datamodule else None)
            dataset = getattr(loader[0] if isinstance(loader, (list, tuple)) else loader, "dataset", None)
            self.frames = []
            if not hasattr(dataset, "dense_sample"):
                rank_zero_warn(f"EmbeddingPanels: {type(dataset).__name__} has no dense_sample(i) (frame and whole flow); no panels")
                return self.frames
            self.max_magnitude = dataset.max_magnitude
            for i in range(min(self.num_frames, len(dataset))):
                sample = dataset.dense_sample(i)
                if sample is not None:
                    pixels = choose_pixels(*sample["frame"].shape[:2], self.num_pixels, self.seed + i, sample["valid"])
                    self.frames.append((sample["key"], sample["frame"], sample["flow"], pixels))
        return self.frames
