"""Inference backends behind one interface: vLLM (production) and in-process transformers + PEFT."""

from __future__ import annotations

from pathlib import Path

from app.core.config import Settings
from app.inference.base import (
    AdapterRef,
    GenerationRequest,
    GenerationResult,
    InferenceBackend,
    StreamDelta,
)
from foundation.model import (
    ModelNotFoundError,
    base_model_folder,
    bundled_gguf_dir,
    prepare_base_model,
)

__all__ = [
    "AdapterRef",
    "GenerationRequest",
    "GenerationResult",
    "InferenceBackend",
    "StreamDelta",
    "build_backend",
    "local_model_status",
    "model_folder",
    "prepare_model_folder",
]


def build_backend(settings: Settings) -> InferenceBackend:
    """The backend the settings choose (nothing is loaded or connected yet)."""
    if settings.inference_backend == "vllm":
        from app.inference.vllm import VllmBackend

        key = settings.vllm_api_key.get_secret_value() if settings.vllm_api_key else None
        return VllmBackend(
            settings.vllm_urls,
            settings.served_model_name,
            api_key=key,
            timeout_s=settings.vllm_timeout_s,
        )
    from app.inference.local import LocalBackend

    return LocalBackend(
        lambda: prepare_model_folder(settings),
        settings.local_max_adapters,
        probe=lambda: local_model_status(settings),
        threads=settings.local_threads,
        max_batch=settings.local_max_batch,
        max_queue=settings.local_max_queue,
    )


def model_folder(settings: Settings) -> Path:
    """The HF folder of the served base model, whether or not it has been prepared yet."""
    return base_model_folder(settings.data_dir, settings.base_model)


def local_model_status(settings: Settings) -> tuple[bool, str]:
    """(ok, detail) without loading or converting anything: can the base model be loaded?"""
    folder = model_folder(settings)
    if (folder / "config.json").is_file():
        return True, f"local: model loads on first request from {folder}"
    if settings.base_model != "bundled":
        return False, f"local: no model folder at {folder}"
    try:
        bundled_gguf_dir()
    except ModelNotFoundError as exc:
        return False, f"local: {exc}"
    return True, f"local: the bundled model is converted into {folder} on first request"


def prepare_model_folder(settings: Settings) -> Path:
    """The base model folder, converting the bundled model on first use (slow, needs torch)."""
    return prepare_base_model(settings.data_dir, settings.base_model)
