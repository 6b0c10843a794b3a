"""The pre-publish check refuses every adapter vLLM would refuse to load, and only those.

The adapter folders are written here (adapter_config.json + a safetensors file whose tensors are
all zeros): the check reads the config and the safetensors header, never the weights. A real
trained adapter goes through it in tests/integration/test_job_hardening.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support import make_settings
from worker.servable import AdapterNotServable, check_servable

PREFIX = "base_model.model.model.layers.0"
HIDDEN = 32


def _lora(module: str, rank: int) -> dict[str, list[int]]:
    """lora_A is [rank, in], lora_B is [out, rank] (PEFT's layout for a linear layer)."""
    name = f"{PREFIX}.{module}"
    return {f"{name}.lora_A.weight": [rank, HIDDEN], f"{name}.lora_B.weight": [HIDDEN, rank]}


def _write_adapter(
    folder: Path, config: dict[str, Any] | None = None, tensors: dict[str, list[int]] | None = None
) -> Path:
    """A PEFT-shaped adapter folder: rank 8 on q_proj/v_proj unless told otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    base = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "bias": "none"}
    (folder / "adapter_config.json").write_text(json.dumps({**base, **(config or {})}))
    tensors = tensors if tensors is not None else {**_lora("q_proj", 8), **_lora("v_proj", 8)}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors.items():
        size = 4 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    (folder / "adapter_model.safetensors").write_bytes(
        len(raw).to_bytes(8, "little") + raw + bytes(offset)
    )
    return folder


@pytest.fixture
def settings(tmp_path: Path) -> Any:
    return make_settings(tmp_path, vllm_max_lora_rank=16, train_defaults={"lora_rank": 8})


def test_a_plain_lora_adapter_within_the_rank_passes(settings: Any, tmp_path: Path) -> None:
    check_servable(settings, _write_adapter(tmp_path / "ok"))
    at_limit = {**_lora("q_proj", 16), **_lora("down_proj", 16)}
    check_servable(settings, _write_adapter(tmp_path / "at", {"r": 16}, at_limit))


@pytest.mark.parametrize(
    ("config", "tensors", "reason"),
    [
        ({"r": 32}, {**_lora("q_proj", 32)}, "LoRA rank 32 is above the server's maximum 16"),
        ({"rank_pattern": {"q_proj": 64}}, None, "LoRA rank 64"),
        ({}, {**_lora("q_proj", 8), **_lora("o_proj", 32)}, "LoRA rank 32"),  # config says 8
        ({"use_dora": True}, None, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, None, "modules_to_save ['lm_head']"),
        ({"bias": "lora_only"}, None, "bias"),
        ({"target_modules": ["q_proj", "lm_head"]}, None, "LoRA on lm_head"),
        ({}, {**_lora("q_proj", 8), **_lora("lm_head", 8)}, "LoRA on lm_head"),
        ({}, {**_lora("q_proj", 8), f"{PREFIX}.q_proj.lora_magnitude_vector": [HIDDEN]}, "tensor"),
        ({}, {"base_model.model.model.embed_tokens.lora_embedding_A": [8, HIDDEN]}, "tensor"),
        ({}, {"base_model.model.lm_head.weight": [HIDDEN, HIDDEN]}, "not a LoRA A/B weight"),
    ],
)
def test_what_vllm_refuses_is_refused_with_the_reason(
    settings: Any,
    tmp_path: Path,
    config: dict[str, Any],
    tensors: dict[str, list[int]] | None,
    reason: str,
) -> None:
    folder = _write_adapter(tmp_path / "bad", config, tensors)
    with pytest.raises(AdapterNotServable, match="would refuse this adapter") as refused:
        check_servable(settings, folder)
    assert reason in str(refused.value)


def test_a_folder_without_weights_is_refused(settings: Any, tmp_path: Path) -> None:
    folder = _write_adapter(tmp_path / "partial")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterNotServable, match=r"adapter_model\.safetensors"):
        check_servable(settings, folder)
