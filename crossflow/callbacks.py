"""Training callbacks of the pretraining and eval configs."""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from crossflow.data.resumable import run_seed
from crossflow.visualize import choose_pixels, frame_panels


class InitialCheckpoint(L.Callback):
    """Saves the network as initialised, before the first step, as ``dirpath/init.ckpt``:
    the "same network at random initialisation" that `crossflow summary` compares against."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0 and not trainer.fast_dev_run:
            trainer.save_checkpoint(self.dirpath / "init.ckpt", weights_only=False)


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed torch (CPU and CUDA), NumPy and ``random`` from ``(seed, step, rank)``."""
    value = int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)


class ResumableCheckpoint(ModelCheckpoint):
    """``dirpath/last.ckpt`` every ``every_n_train_steps`` steps and when SIGTERM stops the run: the state that
    ``--ckpt_path last`` continues from as if never stopped (weights, optimiser, loop progress, and the position of
    the training loader, :class:`crossflow.data.resumable.ResumableLoader`). Written atomically (the CLI's
    :class:`crossflow.checkpoints.SafeCheckpointIO`).

    The random draws of each training step (dropout) come from generators seeded with (seed, global step, rank) as
    the step starts, so they do not depend on what ran before it: a resumed run draws what the uninterrupted one drew.

    SIGTERM (what SLURM sends before preempting or at the time limit): Lightning's handler lets the current step
    finish and stops every DDP rank after the same step (``SIGTERMException``, exit status 0); this callback saves then:
    at the step's end, in the epoch's validation, or at the epoch's end before Lightning marks the epoch done (a
    checkpoint of the instant after, which Lightning would resume an epoch late, is not written).
    """

    def __init__(self, dirpath: str, every_n_train_steps: int = 1000):
        super().__init__(dirpath=dirpath, save_top_k=0, save_last=True, every_n_train_steps=every_n_train_steps,
                         enable_version_counter=False)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        seed_step(run_seed(), trainer.global_step, trainer.global_rank)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.received_sigterm:  # saved here, where the interval's checkpoints are, rather than as Lightning stops
            self.write_last(trainer, "SIGTERM")
        else:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.received_sigterm:  # after the epoch's validation: saved before Lightning marks the epoch done
            self.write_last(trainer, "SIGTERM")
        else:
            super().on_train_epoch_end(trainer, pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        epochs = trainer.fit_loop.epoch_progress.current
        if epochs.completed < epochs.started:  # in the epoch's validation: not saved at a batch end yet
            self.write_last(trainer, "SIGTERM")
        elif self._last_global_step_saved != trainer.global_step:  # in the instant after the epoch-end hooks: Lightning
            rank_zero_info(  # would resume a checkpoint saved now one epoch late, so the last one stands
                f"SIGTERM between epochs: not saved; {self.last_model_path} holds step {self._last_global_step_saved}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write_last(trainer)  # the final state, whatever the interval

    def write_last(self, trainer: L.Trainer, reason: str | None = None) -> None:
        """Write ``last.ckpt`` unless this step is in it already (every rank calls this: DDP saves collectively)."""
        path = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        if not trainer.fast_dev_run and self._last_global_step_saved != trainer.global_step:
            trainer.save_checkpoint(path, weights_only=False)  # the whole training state, not only the weights
            self._last_global_step_saved, self.last_model_path = trainer.global_step, str(path)
            if reason:
                rank_zero_info(f"{reason}: saved {path} at step {trainer.global_step}; continue with --ckpt_path last")


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
