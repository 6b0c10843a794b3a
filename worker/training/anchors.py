"""Base responses (the base model's own answers) and reference log-probs, computed when missing.

Cache keys are built in worker.training.cache (base_response_key, reference_key).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from foundation.model import CausalLM, autocast
from foundation.pairs import Messages, Pair
from foundation.train_config import TrainConfig
from worker.training.cache import (
    KeyValueCache,
    MemoryCache,
    base_response_key,
    reference_key,
)
from worker.training.data import encode_prompt, encode_response
from worker.training.logprobs import score_sequences

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


@dataclass(frozen=True)
class Generation:
    """A model's own answer: its text and the token ids it generated.

    `token_ids` are exactly what the model produced, up to and including its end-of-turn token
    when it `finished` within the budget; an answer cut at max_new_tokens has no end-of-turn, so
    the anchor never scores a token the model did not write.
    """

    text: str
    token_ids: list[int]
    finished: bool

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (how the caches store it)."""
        return {"text": self.text, "ids": self.token_ids, "finished": self.finished}

    @classmethod
    def from_json(cls, value: Any) -> Generation:
        """From a cached value (a dict, or its JSON text as the database stores it)."""
        data = json.loads(value) if isinstance(value, str) else value
        return cls(str(data["text"]), [int(t) for t in data["ids"]], bool(data["finished"]))


@dataclass
class Anchors:
    """Per pair (input order): the base answer and reference log-probs of chosen/rejected/base.

    Without base answers (DPO never scores them) `base_responses` and `ref_base` are None."""

    base_responses: list[Generation] | None
    ref_chosen: list[float]
    ref_rejected: list[float]
    ref_base: list[float] | None
    stats: CacheStats

    def ref_logps(self, i: int) -> tuple[float, ...]:
        """log πref of pair i's (chosen, rejected[, base]) — what EncodedPair.ref_logps holds."""
        known = (self.ref_chosen[i], self.ref_rejected[i])
        return known if self.ref_base is None else (*known, self.ref_base[i])

    def base_ids(self, i: int) -> list[int] | None:
        """The token ids of pair i's base answer, if there are base answers."""
        return None if self.base_responses is None else self.base_responses[i].token_ids


def reference_mode(model: CausalLM) -> contextlib.AbstractContextManager[Any]:
    """Context in which `model` is the reference: adapters disabled on a PEFT model."""
    if hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    return contextlib.nullcontext()


def end_token_ids(model: CausalLM, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Token ids that end a generated turn (the generation config's eos ids and the tokenizer's)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.eos_token_id)
    return {int(i) for i in ids if i is not None}


def generate_answers(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Messages],
    max_new_tokens: int,
    batch_size: int,
    do_sample: bool = False,
    *,
    max_prompt_tokens: int = 1 << 30,
) -> list[Generation]:
    """The model's own answers (greedy by default), batched with left padding, in input order."""
    encoded = [encode_prompt(tokenizer, messages, max_prompt_tokens) for messages in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[Generation | None] = [None] * len(encoded)
    device = next(model.parameters()).device
    ends = end_token_ids(model, tokenizer)
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
            for i, row in zip(chunk, output[:, ids.shape[1] :].tolist(), strict=True):
                answers[i] = _generation(tokenizer, row, ends)
    return [a for a in answers if a is not None]


def _generation(tokenizer: PreTrainedTokenizerBase, row: list[int], ends: set[int]) -> Generation:
    """One generated row: cut after its first end-of-turn token (the rest is padding)."""
    stop = next((k for k, token in enumerate(row) if token in ends), None)
    token_ids = row if stop is None else row[: stop + 1]
    text = str(tokenizer.decode(token_ids, skip_special_tokens=True))
    return Generation(text, token_ids, stop is not None)


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
    with_base: bool | None = None,
) -> Anchors:
    """Fill both caches for `pairs`, computing only missing entries, with the model as reference.

    Base answers are generated and scored only `with_base` (default: when the config's method
    uses the anchor; DPO does not, so its jobs skip the generation entirely)."""
    base_cache = base_cache if base_cache is not None else MemoryCache()
    ref_cache = ref_cache if ref_cache is not None else MemoryCache()
    if with_base is None:
        with_base = config.effective_anchor_weight > 0
    stats = CacheStats()
    with reference_mode(model):
        if on_phase:
            on_phase("base_responses")
        base = (
            _base_responses(model, tokenizer, pairs, config, identity, base_cache, stats)
            if with_base
            else None
        )
        if on_phase:
            on_phase("reference_logprobs")
        kinds = 3 if base is not None else 2
        items: list[tuple[Pair, str | Generation]] = []
        for i, p in enumerate(pairs):
            items += [(p, p.chosen), (p, p.rejected)] + ([(p, base[i])] if base is not None else [])
        logps = _reference_logprobs(model, tokenizer, items, config, identity, ref_cache, stats)
    ref_base = logps[2::3] if base is not None else None
    return Anchors(base, logps[0::kinds], logps[1::kinds], ref_base, stats)


def _base_responses(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[Pair],
    config: TrainConfig,
    identity: str,
    cache: KeyValueCache,
    stats: CacheStats,
) -> list[Generation]:
    """Base answer per pair: from the cache, or generated once per distinct missing prompt."""
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
) -> tuple[list[Generation], int, int]:
    """The model's answer per prompt under config's decoding settings, generated once per
    distinct prompt missing from the cache. Returns (answers, generated, distinct prompts).

    Cached values are the Generation's JSON text (the database stores text)."""
    keys = [base_response_key(identity, messages, config) for messages in prompts]
    found = cache.get_many(sorted(set(keys)))
    missing = {k: m for k, m in zip(keys, prompts, strict=True) if k not in found}
    if missing:
        answers = generate_answers(
            model,
            tokenizer,
            list(missing.values()),
            config.base_max_new_tokens,
            config.base_batch_size,
            config.base_do_sample,
            max_prompt_tokens=config.max_prompt_tokens,
        )
        fresh = {k: json.dumps(a.to_json()) for k, a in zip(missing, answers, strict=True)}
        cache.put_many(fresh)
        found.update(fresh)
    return [Generation.from_json(found[key]) for key in keys], len(missing), len(set(keys))


def _reference_logprobs(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    items: list[tuple[Pair, str | Generation]],
    config: TrainConfig,
    identity: str,
    cache: KeyValueCache,
    stats: CacheStats,
) -> list[float]:
    """log πref(response | prompt) per (pair, response) item, scoring distinct missing ones once.

    A response is a text (encoded as the template writes an assistant turn) or a Generation
    (scored on the token ids the model produced)."""
    keys = [
        reference_key(identity, pair.messages, _key_material(response), config)
        for pair, response in items
    ]
    found = cache.get_many(sorted(set(keys)))
    missing = {key: item for key, item in zip(keys, items, strict=True) if key not in found}
    if missing:
        rows = [
            (
                encode_prompt(tokenizer, pair.messages, config.max_prompt_tokens),
                response_ids(tokenizer, pair.messages, response, config.max_response_tokens),
            )
            for pair, response in missing.values()
        ]
        scores = score_sequences(model, rows, tokenizer.pad_token_id, config.score_batch_size)
        fresh = dict(zip(missing, scores, strict=True))
        cache.put_many(fresh)
        found.update(fresh)
    stats.ref_computed += len(missing)
    stats.ref_reused += len(set(keys)) - len(missing)
    return [float(found[key]) for key in keys]


def _key_material(response: str | Generation) -> str:
    """What a reference log-prob's cache key hashes: the text, or a generation's token ids."""
    if isinstance(response, Generation):
        return "ids:" + ",".join(map(str, response.token_ids))
    return response


def response_ids(
    tokenizer: PreTrainedTokenizerBase,
    messages: Messages,
    response: str | Generation,
    max_response_tokens: int,
) -> list[int]:
    """Token ids of a response: a generation's own ids, or the template's encoding of a text."""
    if isinstance(response, Generation):
        return response.token_ids[:max_response_tokens] or response.token_ids[:1]
    return encode_response(tokenizer, messages, response, max_response_tokens)
