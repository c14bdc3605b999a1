"""Outputs that appear whole or not at all: write to a temporary file, then rename."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError, OutputExistsError

__all__ = ["check_output", "atomic_output", "require_file"]


def require_file(path: str | Path, what: str = "file") -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} not found: {path}: check the path")
    if not path.is_file():
        raise InputError(f"{what} {path} is not a regular file: give a file path")
    return path


def _same_file(a: Path, b: Path) -> bool:
    """Only a file that exists can be overwritten ('digits' names no file, a new --out none)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def check_output(path: str | Path, force: bool, *, inputs: dict[str, str | Path] | None = None) -> Path:
    """Refuse to replace an existing output without --force; fail early, before any work.

    `inputs` (option name -> path) are never overwritten, not even with --force.
    """
    path = Path(path)
    for option, other in (inputs or {}).items():
        if other is not None and _same_file(path, Path(other)):
            raise InputError(
                f"{path} is also the {option} input: inputs are never overwritten; "
                "choose another output path"
            )
    if path.exists() and not force:
        raise OutputExistsError(f"{path} exists: pass --force to replace it, or choose another --out")
    if path.exists() and path.is_dir():
        raise InputError(f"{path} is a directory: give a file path for the output")
    if not path.parent.exists():
        raise InputError(f"folder {path.parent} does not exist: create it first")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_output(path: str | Path, force: bool, *, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds."""
    path = check_output(path, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # temp files are 0600; outputs get the usual mode unless asked otherwise
        os.chmod(tmp_path, mode if mode is not None else 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except BaseException:  # KeyboardInterrupt included: never leave a partial file
        tmp_path.unlink(missing_ok=True)
        raise
