"""Judging generated answers with the base model: fluency, degeneracy and persona movement.

* fluency — the base model's per-token negative log-likelihood of an answer (no instruction):
  broken text is unlikely under the model that wrote fluent text.
  Only the answer's content counts: its end-of-turn (and anything after it) is not scored,
  because *where* an answer stops is what a concise or a thorough user changes, not whether its
  text is well formed (the base model finds a six-word answer's early end-of-turn very unlikely).
* degenerate — an answer that is empty, repeats itself (the share of repeated token 4-grams above
  REPEATED_NGRAM_LIMIT), or whose NLL lies above a bound: a fixed number, or a LengthBand — the
  95th percentile of the per-token NLL of the *first n tokens* of text known to be fluent (the
  base's own answers and human-written responses), for n the answer's length. A per-token mean
  over 6 tokens spreads far wider than one over 64, so a short fluent answer judged against a
  band of long texts would count as broken.
* persona score — how much more likely an answer is under the base model when the user's
  preference is given as an instruction than without it, per token:
      s(y) = (log π0(y | x ⊕ instruction) − log π0(y | x)) / |y|
  An adapter moves toward the user when its answer scores higher than the base model's own.
  Known biases: the judge favours its own style (the base model's answers under the instruction),
  and per-token averaging still favours lengths the instruction asks for; see bench/README.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from foundation.model import CausalLM
from foundation.pairs import Messages
from foundation.stats import quantile as quantile_of
from worker.training.data import encode_prompt
from worker.training.logprobs import score_tokens

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

NGRAM = 4
REPEATED_NGRAM_LIMIT = 0.5  # more than half of an answer's 4-grams repeat an earlier one
JUDGE_MAX_PROMPT_TOKENS = 512
# What fluency scores, named so cached or recorded NLLs of an older rule are never mixed in:
# v2 scores the answer's content only (no end-of-turn) and bounds it by length.
FLUENCY_RULE = "content-nll-v2"
BAND_LENGTHS = (2, 4, 8, 16, 32, 64)  # answer lengths (tokens) a LengthBand has a bound for
MIN_BAND_TEXTS = 20  # fewer fluent texts reach a length: use the bound of the next shorter one


@dataclass(frozen=True)
class LengthBand:
    """NLL bounds by answer length: `bound(n)` is the bound of the longest length ≤ n."""

    lengths: tuple[int, ...]
    bounds: tuple[float, ...]
    quantile: float
    texts: tuple[int, ...]  # fluent texts that reached each length

    def bound(self, n: int) -> float:
        """The NLL bound of an n-token answer (the shortest length's below the grid)."""
        value = self.bounds[0]
        for length, bound in zip(self.lengths, self.bounds, strict=True):
            if length <= n:
                value = bound
        return value

    def to_json(self) -> dict[str, object]:
        """JSON-ready dict."""
        return {
            "rule": FLUENCY_RULE,
            "quantile": self.quantile,
            "lengths": list(self.lengths),
            "bounds": list(self.bounds),
            "texts": list(self.texts),
        }


@dataclass(frozen=True)
class Fluency:
    """Per answer: base-model NLL per token and whether the answer is degenerate."""

    nll: list[float]
    degenerate: list[bool]
    tokens: list[int] = field(default_factory=list)  # content tokens scored per answer

    @property
    def degenerate_fraction(self) -> float:
        """Share of degenerate answers (0 for none)."""
        return sum(self.degenerate) / len(self.degenerate) if self.degenerate else 0.0

    @property
    def mean_nll(self) -> float:
        """Mean per-token NLL."""
        return sum(self.nll) / len(self.nll) if self.nll else 0.0


def with_instruction(messages: Messages, instruction: str) -> Messages:
    """The chat with `instruction` appended to its last user turn (how preferences are stated)."""
    last = messages[-1]
    content = f"{last['content']}\n\n{instruction}"
    return [*messages[:-1], {"role": last["role"], "content": content}]


def repeated_ngram_fraction(token_ids: Sequence[int], n: int = NGRAM) -> float:
    """Share of the answer's token n-grams that already occurred earlier in it (0 when short)."""
    grams = [tuple(token_ids[i : i + n]) for i in range(len(token_ids) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def content_ids(token_ids: Sequence[int], end_of_turn: int | None) -> list[int]:
    """An answer's ids before its first end-of-turn token (all of them when it has none)."""
    ids = list(token_ids)
    return ids[: ids.index(end_of_turn)] if end_of_turn in ids else ids


def token_nll(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Messages],
    answers: Sequence[Sequence[int]],
    batch_size: int = 16,
) -> list[list[float]]:
    """Per-token NLL of each answer's token ids given its prompt, under `model`."""
    rows = [
        (encode_prompt(tokenizer, messages, JUDGE_MAX_PROMPT_TOKENS), list(ids) or [0])
        for messages, ids in zip(prompts, answers, strict=True)
    ]
    scores = score_tokens(model, rows, tokenizer.pad_token_id, batch_size)
    return [[-value for value in row] for row in scores]


def answer_nll(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Messages],
    answers: Sequence[Sequence[int]],
    batch_size: int = 16,
) -> list[float]:
    """Mean per-token NLL of each answer's token ids given its prompt, under `model`."""
    return [_mean(row) for row in token_nll(model, tokenizer, prompts, answers, batch_size)]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def length_band(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Messages],
    fluent: Sequence[Sequence[int]],
    quantile: float,
    batch_size: int = 16,
) -> LengthBand:
    """A LengthBand from known-fluent answers (token ids, end-of-turn allowed) to prompts: per
    length n in BAND_LENGTHS, the quantile of the per-token NLL of their first n content tokens."""
    eot = tokenizer.eos_token_id
    contents = [content_ids(ids, eot) for ids in fluent]
    per_token = token_nll(model, tokenizer, prompts, [c or [0] for c in contents], batch_size)
    per_token = [row for row, c in zip(per_token, contents, strict=True) if c]
    lengths: list[int] = []
    bounds: list[float] = []
    texts: list[int] = []
    for n in BAND_LENGTHS:
        prefixes = [_mean(row[:n]) for row in per_token if len(row) >= n]
        if len(prefixes) < MIN_BAND_TEXTS and bounds:
            break  # too few texts this long: longer answers keep the last bound
        lengths.append(n)
        bounds.append(quantile_of(prefixes, quantile) if prefixes else math.inf)
        texts.append(len(prefixes))
    return LengthBand(tuple(lengths), tuple(bounds), quantile, tuple(texts))


def fluency(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Messages],
    answers: Sequence[tuple[str, Sequence[int]]],
    nll_bound: float | LengthBand = math.inf,
    batch_size: int = 16,
) -> Fluency:
    """NLL per content token and degeneracy of (text, token ids) answers, judged by `model` (the
    base) against a fixed bound or a LengthBand."""
    contents = [content_ids(ids, tokenizer.eos_token_id) for _, ids in answers]
    nll = answer_nll(model, tokenizer, prompts, contents, batch_size)
    degenerate = [
        is_degenerate(text, ids, value, bound_for(nll_bound, len(content)))
        for (text, ids), content, value in zip(answers, contents, nll, strict=True)
    ]
    return Fluency(nll, degenerate, [len(c) for c in contents])


def bound_for(nll_bound: float | LengthBand, tokens: int) -> float:
    """The NLL bound that applies to an answer of `tokens` content tokens."""
    return nll_bound.bound(tokens) if isinstance(nll_bound, LengthBand) else nll_bound


def persona_scores(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Messages],
    answers: Sequence[Sequence[int]],
    instruction: str,
    batch_size: int = 16,
) -> list[float]:
    """Per answer: (log π0(y | x ⊕ instruction) − log π0(y | x)) / |y| under `model` (the base)."""
    plain = answer_nll(model, tokenizer, prompts, answers, batch_size)
    instructed = [with_instruction(messages, instruction) for messages in prompts]
    told = answer_nll(model, tokenizer, instructed, answers, batch_size)
    return [p - t for p, t in zip(plain, told, strict=True)]


def is_degenerate(
    text: str, token_ids: Sequence[int], nll: float, nll_bound: float = math.inf
) -> bool:
    """fluency()'s rule for one answer whose NLL is already known (e.g. a cached base answer):
    empty, more than REPEATED_NGRAM_LIMIT of its 4-grams repeated, or NLL above the bound."""
    return (
        not text.strip()
        or repeated_ngram_fraction(token_ids) > REPEATED_NGRAM_LIMIT
        or nll > nll_bound
    )
