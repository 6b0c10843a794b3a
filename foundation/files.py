"""Folders other processes read: written in a temp sibling, made readable, renamed into place."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# What marks a folder being written: `.<target name>.tmp-<random>`, beside the target.
TEMP_MARK = ".tmp-"


def publish_permissions(folder: Path) -> None:
    """Make a temp folder (mkdtemp makes it 0700) world-readable: 0755, files 0644.

    Other processes (a vLLM server under another user, say) must be able to read what we publish.
    """
    folder.chmod(0o755)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o644)


@contextlib.contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a temp sibling of `target` to fill; it becomes `target` whole, or is deleted.

    On success the files are made readable and flushed to disk before the rename, so nobody ever
    sees a half-written `target`. An existing `target` must be empty (rename cannot replace a
    folder portably).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TEMP_MARK}", dir=target.parent))
    try:
        yield tmp
        publish_permissions(tmp)
        _fsync_tree(tmp)
        if target.exists():
            target.rmdir()
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def temp_siblings(target: Path) -> list[Path]:
    """The temp folders `atomic_folder` left beside `target` (a killed process cannot clean up)."""
    return sorted(target.parent.glob(f".{glob.escape(target.name)}{TEMP_MARK}*"))


def _fsync_tree(folder: Path) -> None:
    """Flush every file in the folder to disk before it becomes visible under its final name."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
