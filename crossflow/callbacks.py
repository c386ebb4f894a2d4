"""Training callbacks of the pretraining configs."""

from __future__ import annotations

from pathlib import Path

import lightning as L


class InitialCheckpoint(L.Callback):
    """Saves the network as initialised, before the first step, as ``dirpath/init.ckpt``:
    the "same network at random initialisation" that `crossflow summary` compares against."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0 and not trainer.fast_dev_run:
            trainer.save_checkpoint(self.dirpath / "init.ckpt")
