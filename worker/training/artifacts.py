"""Writing a trained adapter: complete (adapter + metrics.json) or not at all."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from foundation.files import atomic_folder

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
    """Save the PEFT adapter + metrics.json into out_dir atomically (foundation.files)."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    # vLLM's resolver only accepts adapters whose base_model_name_or_path is the served model name.
    for peft_config in model.peft_config.values():
        peft_config.base_model_name_or_path = served_model_name
    try:
        with atomic_folder(out_dir) as tmp:
            # save_embedding_layers=False: embeddings are never trained here, and "auto" looks the
            # served name up on the Hugging Face Hub.
            model.save_pretrained(str(tmp), save_embedding_layers=False)
            (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    except Exception as exc:  # e.g. safetensors' "I/O error: No space left on device"
        raise AdapterWriteError(
            f"could not write the adapter into {out_dir.parent}: {type(exc).__name__}: {exc}"
        ) from exc
    return out_dir


def read_metrics(adapter_dir: Path) -> dict[str, Any]:
    """The metrics.json written next to an adapter."""
    data: dict[str, Any] = json.loads((Path(adapter_dir) / METRICS_FILE).read_text("utf-8"))
    return data
