"""The one `crossflow` command.

``crossflow fit|validate|test|predict --config X.yaml`` is Lightning's CLI, with the model
and data module chosen by ``class_path`` (pretraining and every eval run through it);
``crossflow prepare|synth|export|summary|visualize`` are the data, export and inspection tools.
"""

from __future__ import annotations

import argparse
import os
import sys

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from crossflow.checkpoints import LOAD_ERRORS, SafeCheckpointIO, load_error
from crossflow.errors import UserInputError
from crossflow.files import is_write_failure, write_error

TOOLS = {
    "prepare": ("crossflow.data.prepare", "videos -> WebDataset shards of (frame, flow) pairs"),
    "convert-pairs": ("crossflow.data.convert", "prepared pairs -> the same pairs with their flow in another --flow-format"),
    "synth": ("crossflow.data.synthetic", "generate the synthetic world (videos, VOC, ImageFolder)"),
    "export": ("crossflow.export", "checkpoint -> backbone file with batch norm folded"),
    "summary": ("crossflow.summary", "a pretraining run's summary: losses, sigma^2, object-grouping AUC"),
    "visualize": ("crossflow.visualize", "pictures of a checkpoint: embeddings as RGB, kernel rows, conv5 stimuli"),
    "report": ("crossflow.report", "the paper's Tables 1 and 2 from the evals' results.json files"),
}


class UploadConfigCallback(SaveConfigCallback):
    """Saves the resolved config next to the run, and uploads it to every W&B run of the trainer."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update(self.config.as_dict(), allow_val_change=True)


class CrossflowCLI(LightningCLI):
    """Lightning's CLI with crossflow's checkpoint files (:mod:`crossflow.checkpoints`): read with
    ``weights_only=True`` (a file carrying code is refused with one line) and written atomically."""

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the hyper-parameters of `--ckpt_path FILE` here (weights_only=True), before any
        # trainer exists; its refusal becomes our one-line error.
        try:
            super()._parse_ckpt_path()
        except LOAD_ERRORS as error:
            raise load_error(self.config[self.config.subcommand].get("ckpt_path"), error) from None

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not a plug-in the config chose
            trainer.strategy.checkpoint_io = SafeCheckpointIO()
        return trainer


def lightning_main(args: list[str] | None = None) -> None:
    CrossflowCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=UploadConfigCallback,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf+"},
        args=args,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point; ``argv`` defaults to the command line."""
    os.environ.setdefault("WANDB_MODE", "offline")  # no account or network needed; WANDB_MODE=online streams
    from_command_line = argv is None
    argv = list(sys.argv[1:] if from_command_line else argv)
    if argv and argv[0] in TOOLS:
        import importlib

        module_name, help_text = TOOLS[argv[0]]
        module = importlib.import_module(module_name)
        parser = argparse.ArgumentParser(prog=f"crossflow {argv[0]}", description=help_text)
        module.add_arguments(parser)
        try:
            return module.run(parser.parse_args(argv[1:]))
        except UserInputError as error:
            print(f"crossflow {argv[0]}: error: {error}", file=sys.stderr)
            return 2
        except OSError as error:  # a full disk or a read-only output folder: one line, not a traceback
            if not is_write_failure(error):
                raise
            print(f"crossflow {argv[0]}: error: {write_error(None, error)}", file=sys.stderr)
            return 2
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: crossflow {fit,validate,test,predict} --config CONFIG.yaml [--key value ...]")
        print("       crossflow {" + ",".join(TOOLS) + "} ...")
        for name, (_, help_text) in TOOLS.items():
            print(f"  {name:9s} {help_text}")
        print("  fit, validate, test, predict: Lightning's CLI (`crossflow fit --help`)")
        return 0
    try:
        lightning_main(None if from_command_line else argv)
    except Exception as error:
        cause = user_input_cause(error) or (write_error(None, error) if is_write_failure(error) else None)
        if cause is None:
            raise
        print(f"crossflow {argv[0]}: error: {cause}", file=sys.stderr)
        return 2
    finally:
        close_process_group()
    return 0


def close_process_group() -> None:
    """Destroy the DDP process group, if any, before the interpreter exits. Lightning does so only for NCCL; a
    gloo (CPU) group left to the interpreter's teardown can abort the process ("terminate called without an
    active exception") after a finished run."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def user_input_cause(error: BaseException | None) -> UserInputError | None:
    """The :class:`UserInputError` behind ``error``, if any (jsonargparse re-raises an error of a model's or data
    module's constructor as a ``ValueError`` caused by it)."""
    while error is not None and not isinstance(error, UserInputError):
        error = error.__cause__
    return error


if __name__ == "__main__":
    sys.exit(main())
