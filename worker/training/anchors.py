"""Base responses (the base model's own answers) and reference log-probs, computed when missing.

Cache keys are built in worker.training.cache (base_response_key, reference_key).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from worker.training.cache import (
    KeyValueCache,
    MemoryCache,
    base_response_key,
    reference_key,
)
from worker.training.cache import prompt_key as prompt_key  # re-exported for callers
from worker.training.config import TrainConfig
from worker.training.data import Messages, Pair, encode_prompt, encode_response
from worker.training.logprobs import score_sequences
from worker.training.model import CausalLM, autocast

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PhaseCallback = Callable[[str], None]


@dataclass
class CacheStats:
    """How many base responses / reference log-probs were computed vs found in the caches."""

    base_computed: int = 0
    base_reused: int = 0
    ref_computed: int = 0
    ref_reused: int = 0


@dataclass
class Anchors:
    """Per pair (input order): the base response and reference log-probs of chosen/rejected/base."""

    base_responses: list[str]
    ref_chosen: list[float]
    ref_rejected: list[float]
    ref_base: list[float]
    stats: CacheStats


def reference_mode(model: CausalLM) -> contextlib.AbstractContextManager[Any]:
    """Context in which `model` is the reference: adapters disabled on a PEFT model."""
    if hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    return contextlib.nullcontext()


def generate_base_responses(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Messages],
    max_new_tokens: int,
    batch_size: int,
    do_sample: bool = False,
    *,
    max_prompt_tokens: int = 1 << 30,
) -> list[str]:
    """The model's own answers (greedy by default), batched with left padding, in input order."""
    encoded = [encode_prompt(tokenizer, messages, max_prompt_tokens) for messages in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers = [""] * len(encoded)
    device = next(model.parameters()).device
    with torch.no_grad(), autocast(device):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            ids, mask = _left_pad([encoded[i] for i in chunk], tokenizer.pad_token_id)
            output = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                pad_token_id=tokenizer.pad_token_id,
            )
            texts = tokenizer.batch_decode(output[:, ids.shape[1] :], skip_special_tokens=True)
            for i, text in zip(chunk, texts, strict=True):
                answers[i] = text
    return answers


def _left_pad(rows: list[list[int]], pad_token_id: int) -> tuple[Any, Any]:
    """Left-padded [N, T] ids and attention mask (generation continues from the right edge)."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask


def compute_anchors(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[Pair],
    config: TrainConfig,
    identity: str,
    *,
    base_cache: KeyValueCache | None = None,
    ref_cache: KeyValueCache | None = None,
    on_phase: PhaseCallback | None = None,
) -> Anchors:
    """Fill both caches for `pairs`, computing only missing entries, with the model as reference."""
    base_cache = base_cache if base_cache is not None else MemoryCache()
    ref_cache = ref_cache if ref_cache is not None else MemoryCache()
    stats = CacheStats()
    with reference_mode(model):
        if on_phase:
            on_phase("base_responses")
        base = _base_responses(model, tokenizer, pairs, config, identity, base_cache, stats)
        if on_phase:
            on_phase("reference_logprobs")
        triples = [
            (p, text)
            for p, b in zip(pairs, base, strict=True)
            for text in (p.chosen, p.rejected, b)
        ]
        logps = _reference_logprobs(model, tokenizer, triples, config, identity, ref_cache, stats)
    return Anchors(base, logps[0::3], logps[1::3], logps[2::3], stats)


def _base_responses(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[Pair],
    config: TrainConfig,
    identity: str,
    cache: KeyValueCache,
    stats: CacheStats,
) -> list[str]:
    """Base response per pair: from the cache, or generated once per distinct missing prompt."""
    texts, computed, distinct = cached_generations(
        model, tokenizer, [pair.messages for pair in pairs], config, identity, cache
    )
    stats.base_computed += computed
    stats.base_reused += distinct - computed
    return texts


def cached_generations(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Messages],
    config: TrainConfig,
    identity: str,
    cache: KeyValueCache,
) -> tuple[list[str], int, int]:
    """The model's answer per prompt under config's decoding settings, generated once per
    distinct prompt missing from the cache. Returns (answers, generated, distinct prompts)."""
    keys = [base_response_key(identity, messages, config) for messages in prompts]
    found = cache.get_many(sorted(set(keys)))
    missing = {k: m for k, m in zip(keys, prompts, strict=True) if k not in found}
    if missing:
        texts = generate_base_responses(
            model,
            tokenizer,
            list(missing.values()),
            config.base_max_new_tokens,
            config.base_batch_size,
            config.base_do_sample,
            max_prompt_tokens=config.max_prompt_tokens,
        )
        fresh = dict(zip(missing, texts, strict=True))
        cache.put_many(fresh)
        found.update(fresh)
    return [str(found[key]) for key in keys], len(missing), len(set(keys))


def _reference_logprobs(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    items: list[tuple[Pair, str]],
    config: TrainConfig,
    identity: str,
    cache: KeyValueCache,
    stats: CacheStats,
) -> list[float]:
    """log πref(response | prompt) per (pair, response) item, scoring distinct missing ones once."""
    keys = [reference_key(identity, pair.messages, text, config) for pair, text in items]
    found = cache.get_many(sorted(set(keys)))
    missing = {key: item for key, item in zip(keys, items, strict=True) if key not in found}
    if missing:
        rows = [
            (
                encode_prompt(tokenizer, pair.messages, config.max_prompt_tokens),
                encode_response(tokenizer, pair.messages, text, config.max_response_tokens),
            )
            for pair, text in missing.values()
        ]
        scores = score_sequences(model, rows, tokenizer.pad_token_id, config.score_batch_size)
        fresh = dict(zip(missing, scores, strict=True))
        cache.put_many(fresh)
        found.update(fresh)
    stats.ref_computed += len(missing)
    stats.ref_reused += len(set(keys)) - len(missing)
    return [float(found[key]) for key in keys]
