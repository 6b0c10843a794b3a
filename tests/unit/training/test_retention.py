"""The retention gate's measurements on the real bundled model: the base model's MC outcomes and
judged answers are computed once and then read from the cache; a wrecked adapter's answers are
degenerate. (The verdict on these figures: tests/unit/test_gate.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from foundation.model import model_identity
from worker.training.cache import MemoryCache
from worker.training.evaluate import general_mc_path, load_mc
from worker.training.judge import fluency, is_degenerate
from worker.training.retention import (
    FLUENCY_MAX_NEW_TOKENS,
    base_judged_answers,
    check_degeneracy,
    compare_knowledge,
    general_prompts_path,
    load_prompts,
)

NLL_MARGIN = 2.5


class CountingCache(MemoryCache):
    """A MemoryCache that counts the items written into it."""

    def __init__(self) -> None:
        super().__init__()
        self.written = 0

    def put_many(self, items: dict[str, Any]) -> None:
        """Store and count."""
        self.written += len(items)
        super().put_many(items)


@pytest.fixture(scope="module")
def lora_model(model_dir: Path) -> Any:
    """The bundled model with a fresh LoRA adapter (B = 0: the same outputs as the base)."""
    from peft import LoraConfig, get_peft_model

    from foundation.model import load_model

    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    return get_peft_model(load_model(model_dir), config).eval()


def test_shipped_prompts_load() -> None:
    prompts = load_prompts(general_prompts_path())
    assert len(prompts) == 12
    assert all(len(p) == 1 and p[0]["role"] == "user" and p[0]["content"] for p in prompts)


def test_base_mc_outcomes_are_computed_once_then_read_from_the_cache(
    lora_model: Any, tokenizer: Any, model_dir: Path
) -> None:
    questions = load_mc(general_mc_path())[:4]
    cache, identity = CountingCache(), model_identity(model_dir)
    first = compare_knowledge(lora_model, tokenizer, questions, identity, cache)
    assert (first.base_computed, cache.written) == (4, 4)
    assert all(key.startswith(f"gate-mc:{identity}:") for key in cache.data)
    assert first.delta == 0.0 and first.stderr == 0.0  # B = 0: the adapter is the base
    assert first.adapter_accuracy == first.base_accuracy
    second = compare_knowledge(lora_model, tokenizer, questions[:3], identity, cache)
    assert (second.base_computed, cache.written) == (0, 4)  # a subset: nothing recomputed
    other = compare_knowledge(lora_model, tokenizer, questions[:2], "another-model", cache)
    assert other.base_computed == 2  # another base model never reuses them


def test_base_answers_are_judged_once_and_cached_with_their_nll(
    lora_model: Any, tokenizer: Any, model_dir: Path
) -> None:
    prompts = load_prompts(general_prompts_path())[:2]
    cache, identity = CountingCache(), model_identity(model_dir)
    first = check_degeneracy(lora_model, tokenizer, prompts, identity, cache, NLL_MARGIN)
    assert (first.base_computed, cache.written) == (2, 2)
    assert first.adapter_degenerate == first.base_degenerate == 0  # the same, fluent answers
    assert first.adapter_mean_nll == pytest.approx(first.base_mean_nll, abs=1e-4)
    second = check_degeneracy(lora_model, tokenizer, prompts, identity, cache, NLL_MARGIN)
    assert (second.base_computed, cache.written) == (0, 2)
    assert second.nll_bound == first.nll_bound
    answers, nll, computed = base_judged_answers(lora_model, tokenizer, prompts, identity, cache)
    assert computed == 0 and first.nll_bound == pytest.approx(max(nll) + NLL_MARGIN)
    assert all(0 < len(a.token_ids) <= FLUENCY_MAX_NEW_TOKENS for a in answers)
    with lora_model.disable_adapter():  # the cached flags follow fluency()'s rule
        judged = fluency(lora_model, tokenizer, prompts, [(a.text, a.token_ids) for a in answers])
    assert judged.nll == pytest.approx(nll, abs=1e-4)
    flags = [is_degenerate(a.text, a.token_ids, v) for a, v in zip(answers, nll, strict=True)]
    assert flags == judged.degenerate


def test_a_wrecked_adapter_answers_degenerately(model_dir: Path, tokenizer: Any) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    from foundation.model import load_model

    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(load_model(model_dir), config).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 2.0)
    prompts = load_prompts(general_prompts_path())[:2]
    check = check_degeneracy(
        model, tokenizer, prompts, model_identity(model_dir), MemoryCache(), 2.5
    )
    assert check.base_degenerate == 0
    assert check.adapter_degenerate == 2, check
