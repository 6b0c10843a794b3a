"""Model preparation: the bundled GGUF converted once into a plain, cached HF folder."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from foundation.model import ModelNotFoundError, model_identity, prepare_base_model

pytestmark = pytest.mark.slow


def test_prepared_folder_is_plain_and_cached(data_dir: Path, model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert (model_dir / "model.safetensors").is_file()
    assert (model_dir / "generation_config.json").is_file()
    assert model_dir.stat().st_mode & 0o005 == 0o005  # readable by a vLLM server of another user
    started = time.perf_counter()
    assert prepare_base_model(data_dir) == model_dir
    assert time.perf_counter() - started < 1.0  # no second conversion
    assert not [p for p in model_dir.parent.iterdir() if ".tmp-" in p.name]


def test_identity_is_stable_and_names_the_folder(model_dir: Path) -> None:
    identity = model_identity(model_dir)
    assert identity == model_identity(model_dir)
    assert identity.startswith("smollm2-135m-instruct-") and len(identity.split("-")[-1]) == 16


def test_other_sources_are_folders_used_as_is(model_dir: Path, tmp_path: Path) -> None:
    assert prepare_base_model(tmp_path, str(model_dir)) == model_dir
    with pytest.raises(ModelNotFoundError, match=r"config\.json"):
        prepare_base_model(tmp_path, str(tmp_path / "missing"))


def test_converted_tokenizer_matches_the_gguf_one(tokenizer: Any, gguf_tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "Name three colours, please."}]
    kwargs = {"tokenize": False, "add_generation_prompt": True}
    ours = tokenizer.apply_chat_template(messages, **kwargs)
    theirs = gguf_tokenizer.apply_chat_template(messages, **kwargs)
    assert ours == theirs
    assert tokenizer(ours)["input_ids"] == gguf_tokenizer(theirs)["input_ids"]
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "left"


def test_bundled_model_answers_sensibly(base_model: Any, tokenizer: Any) -> None:
    from worker.training.anchors import generate_answers

    prompts = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "Say hello."}],
    ]
    answers = [a.text for a in generate_answers(base_model, tokenizer, prompts, 12, batch_size=2)]
    assert "Paris" in answers[0]
    single = [
        a.text for a in generate_answers(base_model, tokenizer, prompts[:1], 12, batch_size=1)
    ]
    assert single[0] == answers[0]  # left padding does not change greedy answers


def test_identity_covers_every_weight_byte_configs_and_numerics(tmp_path: Path) -> None:
    """Two folders that differ only after the first MiB of weights, or only in their generation
    config, or one model on CPU vs CUDA, must never share engine caches."""
    import torch

    first = tmp_path / "m"
    first.mkdir()
    (first / "config.json").write_text("{}")
    (first / "generation_config.json").write_text('{"eos_token_id": 2}')
    weights = bytearray(3 << 20)
    (first / "model.safetensors").write_bytes(bytes(weights))
    base = model_identity(first, torch.device("cpu"))
    other = tmp_path / "other" / "m"
    other.parent.mkdir()
    weights[-1] = 1  # the last byte of 3 MiB
    other.mkdir()
    (other / "config.json").write_text("{}")
    (other / "generation_config.json").write_text('{"eos_token_id": 2}')
    (other / "model.safetensors").write_bytes(bytes(weights))
    assert model_identity(other, torch.device("cpu")) != base
    (first / "generation_config.json").write_text('{"eos_token_id": 3}')
    changed = model_identity(first, torch.device("cpu"))
    assert changed != base
    assert model_identity(first, torch.device("cuda")) != changed  # bf16 numbers vs fp32
