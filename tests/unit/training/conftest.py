"""Fixtures for the training engine: the bundled model, converted once and shared, and tiny pairs.

The converted model folder lives in BAPO_TEST_DATA_DIR (default: the repository's data/, the same
cache `bapo` and the service use), so the ~20 s conversion happens once per machine, not per run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session", autouse=True)
def _torch_threads() -> None:
    """One intra-op thread by default: on a shared 2-core machine, two threads that wait on each
    other while other processes hold the cores ran ~10x slower here (generation: 2 s vs 29 s)."""
    import torch

    torch.set_num_threads(int(os.environ.get("BAPO_TEST_TORCH_THREADS", "1")))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Where the converted bundled model is cached."""
    return Path(os.environ.get("BAPO_TEST_DATA_DIR") or REPO_ROOT / "data")


@pytest.fixture(scope="session")
def model_dir(data_dir: Path) -> Path:
    """The bundled model as a safetensors folder (converted on first use)."""
    from foundation.model import prepare_base_model

    return prepare_base_model(data_dir)


@pytest.fixture(scope="session")
def gguf_tokenizer() -> Any:
    """The bundled tokenizer read straight from the GGUF: no conversion needed (fast tests)."""
    from transformers import AutoTokenizer

    from foundation.model import BUNDLED_GGUF, bundled_gguf_dir

    tokenizer = AutoTokenizer.from_pretrained(str(bundled_gguf_dir()), gguf_file=BUNDLED_GGUF)
    tokenizer.padding_side = "left"
    return tokenizer


@pytest.fixture(scope="module")
def base_model(model_dir: Path) -> Any:
    """The bundled model in eval mode on CPU (one load per test module)."""
    from foundation.model import load_model

    return load_model(model_dir)


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path) -> Any:
    """The converted model's tokenizer."""
    from foundation.model import load_tokenizer

    return load_tokenizer(model_dir)
