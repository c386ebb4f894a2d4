"""Writing files so that an interrupted or failed write never leaves a partial file under the final name."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

from crossflow.errors import UserInputError

# errno values of a write that the user can fix: full disk or quota, file-size limit, read-only or forbidden folder.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR})


class WriteError(UserInputError):
    """An output file could not be written (full disk, read-only folder)."""


def write_error(path: str | os.PathLike | None, error: OSError) -> WriteError:
    """The one-line error for an output ``path`` (default: the error's file name) that could not be written."""
    path = path or error.filename or "an output file"
    reason = error.strerror or type(error).__name__
    return WriteError(f"cannot write {path}: {reason} (free some space or choose a writable output folder)")


def is_write_failure(error: BaseException) -> bool:
    """Whether ``error`` is an :class:`OSError` of :data:`WRITE_ERRNOS`."""
    return isinstance(error, OSError) and error.errno in WRITE_ERRNOS


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temp file in ``path``'s folder, then ``os.replace`` it onto ``path``; on failure the temp
    file is removed and the error re-raised."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        try:
            tmp.write(text)
            tmp.flush()
        except BaseException:
            tmp.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp.name)
            raise
    os.replace(tmp.name, path)
