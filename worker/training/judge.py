"""Judging generated answers with the base model: fluency, degeneracy and persona movement.

* fluency — the base model's per-token negative log-likelihood of an answer (no instruction):
  broken text is unlikely under the model that wrote fluent text.
* degenerate — an answer that is empty, repeats itself (the share of repeated token 4-grams above
  REPEATED_NGRAM_LIMIT), or whose NLL lies above a bound (e.g. the 95th percentile of text known
  to be fluent: the base's own answers and human-written responses).
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
from dataclasses import dataclass
from typing import TYPE_CHECKING

from worker.training.data import Messages, encode_prompt
from worker.training.logprobs import score_sequences
from worker.training.model import CausalLM

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

NGRAM = 4
REPEATED_NGRAM_LIMIT = 0.5  # more than half of an answer's 4-grams repeat an earlier one
JUDGE_MAX_PROMPT_TOKENS = 512


@dataclass(frozen=True)
class Fluency:
    """Per answer: base-model NLL per token and whether the answer is degenerate."""

    nll: list[float]
    degenerate: list[bool]

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


def answer_nll(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Messages],
    answers: Sequence[Sequence[int]],
    batch_size: int = 16,
) -> list[float]:
    """Per-token NLL of each answer's token ids given its prompt, under `model`."""
    rows = [
        (encode_prompt(tokenizer, messages, JUDGE_MAX_PROMPT_TOKENS), list(ids) or [0])
        for messages, ids in zip(prompts, answers, strict=True)
    ]
    scores = score_sequences(model, rows, tokenizer.pad_token_id, batch_size)
    return [-score / len(row[1]) for score, row in zip(scores, rows, strict=True)]


def fluency(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Messages],
    answers: Sequence[tuple[str, Sequence[int]]],
    nll_bound: float = math.inf,
    batch_size: int = 16,
) -> Fluency:
    """NLL per token and degeneracy of (text, token ids) answers, judged by `model` (the base)."""
    nll = answer_nll(model, tokenizer, prompts, [ids for _, ids in answers], batch_size)
    degenerate = [
        not text.strip() or repeated_ngram_fraction(ids) > REPEATED_NGRAM_LIMIT or value > nll_bound
        for (text, ids), value in zip(answers, nll, strict=True)
    ]
    return Fluency(nll, degenerate)


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


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation between order statistics."""
    if not values:
        return math.inf
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


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
