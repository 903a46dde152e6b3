"""Build a new store directory beside its destination and rename it into place only when complete."""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from loaders.errors import DataError


def check_new_directory(dest: Path, what: str = "store") -> None:
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise DataError(f"{dest}: already exists and is not empty. Choose a new {what} path or remove it first.")


@contextmanager
def atomic_directory(dest: Path) -> Iterator[Path]:
    """Yields a temporary sibling to fill; on success it becomes `dest` (an empty `dest` is replaced), on any
    error it is removed, so a failed or interrupted write never leaves a half-written store."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        if dest.exists():
            dest.rmdir()
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
