"""Writing files atomically: under a temporary name beside the target, renamed only when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, directory: bool = False, prefix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `target` (a file, or a folder with `directory`); on success it
    replaces `target` with the usual permissions, on an exception it is removed."""
    target = Path(target)
    if not target.parent.is_dir():
        raise FileNotFoundError(f"cannot write {target}: folder {target.parent} does not exist")
    prefix = prefix or f".{target.name}."
    try:
        if directory:
            temp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
        else:
            handle, name = tempfile.mkstemp(prefix=prefix, suffix=target.suffix, dir=target.parent)
            os.close(handle)
            temp = Path(name)
    except OSError as error:
        raise OSError(error.errno, f"cannot write {target}: {error.strerror}") from None
    try:
        yield temp
        os.chmod(temp, (0o777 if directory else 0o666) & ~_umask())
        if directory and target.is_dir():
            shutil.rmtree(target)
        os.replace(temp, target)
    finally:
        if temp.is_dir():
            shutil.rmtree(temp, ignore_errors=True)
        else:
            temp.unlink(missing_ok=True)
