"""Writing a trained adapter: complete (adapter + metrics.json) or not at all."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from foundation.files import publish_permissions

if TYPE_CHECKING:
    from foundation.model import CausalLM

METRICS_FILE = "metrics.json"


class AdapterExistsError(FileExistsError):
    """The output folder already exists and is not empty."""


class AdapterWriteError(OSError):
    """The adapter could not be written (disk full, read-only store, ...); nothing was left."""


def check_out_dir(out_dir: Path) -> None:
    """Refuse an output folder that exists and holds anything (adapters are immutable)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise AdapterExistsError(f"output folder exists and is not empty: {out_dir}")


def save_adapter(
    model: CausalLM, out_dir: Path, metrics: dict[str, Any], served_model_name: str
) -> Path:
    """Save the PEFT adapter + metrics.json in a temp sibling folder, then rename it to out_dir."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # vLLM's resolver only accepts adapters whose base_model_name_or_path is the served model name.
    for peft_config in model.peft_config.values():
        peft_config.base_model_name_or_path = served_model_name
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        # save_embedding_layers=False: embeddings are never trained here, and "auto" looks the
        # served name up on the Hugging Face Hub.
        model.save_pretrained(str(tmp), save_embedding_layers=False)
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        publish_permissions(tmp)
        _fsync_tree(tmp)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); rename cannot replace a folder portably
        tmp.rename(out_dir)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception):  # e.g. safetensors' "I/O error: No space left on device"
            raise AdapterWriteError(
                f"could not write the adapter into {out_dir.parent}: {type(exc).__name__}: {exc}"
            ) from exc
        raise
    return out_dir


def _fsync_tree(folder: Path) -> None:
    """Flush every file in the folder to disk before it becomes visible under its final name."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def read_metrics(adapter_dir: Path) -> dict[str, Any]:
    """The metrics.json written next to an adapter."""
    data: dict[str, Any] = json.loads((Path(adapter_dir) / METRICS_FILE).read_text("utf-8"))
    return data
