"""Folders other processes read: made readable before they are published."""

from __future__ import annotations

from pathlib import Path


def publish_permissions(folder: Path) -> None:
    """Make a temp folder (mkdtemp makes it 0700) world-readable: 0755, files 0644.

    Other processes (a vLLM server under another user, say) must be able to read what we publish.
    """
    folder.chmod(0o755)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o644)
