"""Reading and writing checkpoint files: nothing from a file is ever run, and nothing half-written looks complete.

- :func:`load_checkpoint` reads a file with ``torch.load(weights_only=True)``: tensors, dicts, lists, tuples and
  plain numbers and strings only (crossflow's checkpoints hold nothing else: the hyper-parameters are plain types).
  A file whose pickle names any other class or function (a checkpoint carrying code) is refused with one line
  before anything in it is built.
- :class:`SafeCheckpointIO` is the Lightning checkpoint plug-in of every ``crossflow fit|validate|test`` run
  (:class:`crossflow.cli.CrossflowCLI` installs it): it loads through :func:`load_checkpoint` whatever
  ``weights_only`` Lightning passes, and writes a checkpoint to a temporary file in the checkpoint's own folder,
  flushed to disk, then renamed onto its name. Lightning's own writer stages the file in the system temp folder
  and moves it, which is a copy, not an atomic rename, when that folder is on another disk (and fills a small
  /tmp with a 700 MB checkpoint). A write that fails (full disk, read-only folder) is one line and removes its
  temporary file. (Serialising to memory first, as Lightning's writer does too, costs one checkpoint's size of RAM.)
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from crossflow.errors import InvalidInputError, MissingInputError
from crossflow.files import write_error

# What torch.load raises for a file it refuses or cannot read (a text file's bytes read as pickle opcodes give
# KeyError, IndexError or TypeError).
LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, AttributeError, ImportError,
               KeyError, IndexError, TypeError)


class UnsafeFileError(InvalidInputError):
    """A file that would run code when loaded (its pickle names classes or functions beyond plain data)."""


def load_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> dict:
    """The content of a checkpoint file, read with ``weights_only=True``; one-line errors for a missing file, a
    file that carries code (:class:`UnsafeFileError`) and a file that is not a checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{what} not found: {path}")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except LOAD_ERRORS as error:
        raise load_error(path, error, what) from None
    if not isinstance(content, dict):
        raise InvalidInputError(f"{path} is not a {what}: it holds a {type(content).__name__}, not a dict")
    return content


def init_arguments(hyper_parameters: dict) -> dict:
    """A checkpoint's saved hyper-parameters as constructor arguments (without the ``_class_path`` and other
    ``_``-keys that LightningCLI adds)."""
    return {k: v for k, v in hyper_parameters.items() if not k.startswith("_")}


def module_from_checkpoint(module_class: type, checkpoint: dict):
    """The content of a checkpoint (read by :func:`load_checkpoint`) -> ``module_class`` built from its plain
    hyper-parameters, with its ``state_dict`` loaded, in eval mode. Nothing in the file is unpickled into objects."""
    module = module_class(**init_arguments(checkpoint.get("hyper_parameters", {})))
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()


def load_error(path: str | os.PathLike, error: BaseException, what: str = "checkpoint") -> InvalidInputError:
    """The one-line error for a ``torch.load(weights_only=True)`` failure on ``path``."""
    message = str(error)
    # Only a pickle naming a class or function ("Unsupported global") carries code; other refusals of the
    # weights-only unpickler (a text file, an unknown opcode) are files that are not checkpoints at all.
    found = re.search(r"WeightsUnpickler error: (Unsupported global: .*?)(?: was not an allowed global.*)?$", message, re.MULTILINE)
    if isinstance(error, pickle.UnpicklingError) and found:
        reason = found.group(1).strip()
        return UnsafeFileError(
            f"{path} refused: loading it would build objects that can run code ({reason}); crossflow loads only "
            f"tensors and plain types, as `crossflow fit` writes them. Do not load this file with weights_only=False "
            f"unless you trust where it came from"
        )
    reason = " ".join(f"{type(error).__name__}: {message}".split())[:200]
    return InvalidInputError(f"{path} is not a {what} torch can read ({reason})")


def save_atomic(content: Any, path: str | os.PathLike) -> Path:
    """``torch.save(content)`` to a temporary file beside ``path``, ``fsync``, then ``os.replace`` onto ``path``:
    a reader (or a killed process) sees the old file or the new one, never part of one. A failed write raises
    :class:`crossflow.files.WriteError` (one line) and leaves no temporary file."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    buffer = io.BytesIO()  # serialised first: torch's file writer turns an OSError (and its errno) into a RuntimeError
    torch.save(content, buffer)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        raise write_error(path, error) from None
    return path


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint plug-in with :func:`load_checkpoint` (always ``weights_only=True``) and :func:`save_atomic`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        save_atomic(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(path)
