"""Writing files safely: under a temporary name beside the target, renamed only when complete.

Temporary names carry the id of the process that writes them (`.NAME.cmvae-PID-XXXXXXXX`), so
that a later write of the same target can remove the temporaries of a process that is gone
(killed with SIGKILL, or by a power cut) and leave those of a process still writing alone.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

TEMP_TAG = "cmvae"


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def usual_mode(directory: bool = False) -> int:
    """The permissions `open` or `mkdir` would give a new file or folder under the current umask."""
    return (0o777 if directory else 0o666) & ~umask()


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same existing file or folder, however they are spelled."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def refuse_overwriting_input(output: str | os.PathLike, *inputs: str | os.PathLike) -> None:
    """Raise ValueError when `output` is one of `inputs` (by identity: links and spellings included)."""
    for source in inputs:
        if same_file(output, source):
            raise ValueError(f"the output {output} is the input {source}; choose another output (nothing was "
                             "written)")


def _temporary_prefix(target: Path) -> str:
    return f".{target.name}.{TEMP_TAG}-{os.getpid()}-"


def _process_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by someone else
        return False
    return False


def sweep_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of `target` left by processes that are gone; return what was removed."""
    target = Path(target)
    head = f".{target.name}.{TEMP_TAG}-"
    owner = re.compile(re.escape(head) + r"(\d+)-")
    removed = []
    for path in target.parent.glob(glob.escape(head) + "*"):
        match = owner.match(path.name)
        if match and _process_is_gone(int(match.group(1))):
            _remove(path)
            removed.append(path)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _named_after_target(error: OSError, temp: Path, target: Path) -> OSError:
    """The same error, naming the target instead of the hidden temporary file."""
    if error.filename is not None and Path(error.filename) == temp:
        return type(error)(error.errno, error.strerror, str(target))
    return error


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, prefix: str | None = None) -> Iterator[Path]:
    """Yield a temporary file path beside `target`; on success it replaces `target` with the usual
    permissions, on an exception (Ctrl-C included) it is removed.

    With the default `prefix` the name carries this process's id and stale temporaries of the same
    target are removed first."""
    target = Path(target)
    if not target.parent.is_dir():
        raise FileNotFoundError(f"cannot write {target}: folder {target.parent} does not exist")
    if prefix is None:
        sweep_stale_temporaries(target)
    try:
        handle, name = tempfile.mkstemp(prefix=prefix or _temporary_prefix(target), suffix=target.suffix,
                                        dir=target.parent)
        os.close(handle)
    except OSError as error:
        raise OSError(error.errno, f"cannot write {target}: {error.strerror}") from None
    temp = Path(name)
    try:
        try:
            yield temp
        except OSError as error:
            raise _named_after_target(error, temp, target) from None
        os.chmod(temp, usual_mode())
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)


def _staging_base(target: Path) -> Path:
    """Staging folders are named after this path: inside `target` where it exists, else beside it."""
    return target / "model" if target.is_dir() else target


def sweep_stale_staging(target: str | os.PathLike) -> list[Path]:
    """Remove the staging folders for `target` left by processes that are gone."""
    return sweep_stale_temporaries(_staging_base(Path(target)))


@contextlib.contextmanager
def staging_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder for the files of the folder `target`: inside `target` where it
    exists (the files then move in one by one), else beside it. Removed at the end, whatever happens."""
    base = _staging_base(Path(target))
    sweep_stale_temporaries(base)
    staging = Path(tempfile.mkdtemp(prefix=_temporary_prefix(base), dir=base.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def install_folder(staging: Path, target: Path, replaced: list[str]) -> None:
    """Put the files of `staging` in place as the folder `target`: a rename where `target` does not
    exist, else file by file, replacing only files of these names (`replaced`) and removing those
    of them that the new folder does not have. `config.json`, if any, comes last."""
    os.chmod(staging, usual_mode(directory=True))
    if not target.exists():
        os.rename(staging, target)
        return
    names = sorted((p.name for p in staging.iterdir()), key=lambda n: n == "config.json")
    for name in names:
        if (target / name).exists() and name not in replaced:
            raise FileExistsError(f"cannot write {target / name}: the file is not one this command wrote")
    for name in names:
        os.replace(staging / name, target / name)
    for name in set(replaced) - set(names):
        (target / name).unlink(missing_ok=True)
