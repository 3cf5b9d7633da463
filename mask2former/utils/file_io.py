"""Atomic file writes: the package's one way of writing an output file that must never be seen
half-written (checkpoints, ``last_checkpoint``, ``config.yaml``, ``metrics.json`` after pruning,
``eval_results.json``).

:func:`atomic_write` writes to a temporary file ``.{name}.{random}.tmp`` in the target's
directory, flushes and fsyncs it, gives it the old file's permissions (0644 for a new file) and
``os.replace()``\\ s it over the target, then fsyncs the directory (best effort). On any failure
the temporary file is removed and the target is left as it was. A process killed in the middle
leaves only such a temporary file behind, which :func:`remove_stale_temp_files` deletes.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from typing import BinaryIO, Callable, Iterable, Union

__all__ = ["atomic_write", "remove_stale_temp_files"]

logger = logging.getLogger(__name__)

_TMP_SUFFIX = ".tmp"

#: what :func:`atomic_write` accepts: text (written as UTF-8), bytes, or a function that writes
#: the content into the binary file object it is given (e.g. ``lambda f: torch.save(obj, f)``)
Content = Union[str, bytes, Callable[[BinaryIO], object]]


def atomic_write(path, content: Content) -> None:
    """Replace ``path`` by a file holding ``content``, never leaving a partial file behind."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # Same directory, so that os.replace is a rename on one filesystem, never a copy.
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=_TMP_SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(content, str):
                f.write(content.encode("utf-8"))
            elif isinstance(content, (bytes, bytearray, memoryview)):
                f.write(content)
            elif callable(content):
                content(f)
            else:
                raise TypeError(f"atomic_write({path!r}): content must be str, bytes or a writer "
                                f"function, got {type(content).__name__}")
            f.flush()
            os.fsync(f.fileno())
        try:
            mode = os.stat(path).st_mode & 0o777
        except FileNotFoundError:
            mode = 0o644  # mkstemp's 0600 would make new outputs private
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # Persist the rename itself; not possible on every platform, hence best effort.
    with contextlib.suppress(OSError, AttributeError):
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def remove_stale_temp_files(directory: str, name_prefixes: Iterable[str]) -> None:
    """Delete the temporary files of :func:`atomic_write` calls on files in ``directory`` whose
    names start with one of ``name_prefixes`` (left there by a killed process)."""
    prefixes = tuple("." + p for p in name_prefixes)
    for name in os.listdir(directory):
        if name.startswith(prefixes) and name.endswith(_TMP_SUFFIX):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))
                logger.info("Removed %s, left by an interrupted write", name)
