"""What the benchmark measures on a model (base or adapter), per item so changes can be paired.

Every score comes from the engine's own primitives (chat-template encoding, masked sequence
log-probs, batched generation), so the numbers describe the engine the product ships.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bench.forgetting.datasets import ScoredPair
from foundation.model import CausalLM
from foundation.train_config import TrainConfig
from worker.training.data import EncodedPair, encode_prompt, encode_response
from worker.training.evaluate import (
    MCQuestion,
    MCResult,
    mc_hits,
)
from worker.training.logprobs import pair_logratios, score_sequences

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Row = tuple[list[int], list[int]]


# --- statistics -------------------------------------------------------------------------------


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean (0 for no values)."""
    return sum(values) / len(values) if values else 0.0


def stderr(values: Sequence[float]) -> float:
    """Standard error of the mean, sqrt(sample variance / n) (0 below two values)."""
    n = len(values)
    if n < 2:
        return 0.0
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


def paired_change(before: Sequence[float], after: Sequence[float]) -> dict[str, float]:
    """after − before on the same items: mean change and its paired standard error."""
    if len(before) != len(after):
        raise ValueError("paired samples differ in length")
    diffs = [a - b for a, b in zip(after, before, strict=True)]
    return {"delta": mean(diffs), "stderr": stderr(diffs), "n": float(len(diffs))}


def persona_movement(base: Sequence[float], adapter: Sequence[float]) -> dict[str, Any]:
    """Per prompt, adapter persona score − the base answer's: mean shift, stderr, win rate."""
    moves = [a - b for a, b in zip(adapter, base, strict=True)]
    wins = [1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in moves]
    return {
        "movement": mean(moves),
        "movement_stderr": stderr(moves),
        "win_rate": mean(wins),
        "moves": moves,
        "scores": list(adapter),
    }


# --- multiple choice --------------------------------------------------------------------------


@dataclass
class MCOutcomes:
    """Per-question correctness (summed and length-normalised log-likelihood) on one MC set."""

    hits: list[float]
    hits_norm: list[float]

    def result(self) -> MCResult:
        """The engine's MCResult for these outcomes (accuracy, sample stderr, norm accuracy, n)."""
        n = len(self.hits)
        p = mean(self.hits)
        se = math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0
        return MCResult(p, se, mean(self.hits_norm), n)


def mc_outcomes(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[MCQuestion],
    batch_size: int = 16,
) -> MCOutcomes:
    """Per-question outcomes from the engine's `mc_hits` (the rows and rule of `mc_accuracy`).

    The engine's `mc_accuracy` returns only the aggregate; the benchmark needs each question's
    outcome to give the change after training a paired standard error.
    """
    hits, hits_norm = mc_hits(model, tokenizer, list(questions), batch_size)
    return MCOutcomes(hits, hits_norm)


# --- general alignment (HH-RLHF) --------------------------------------------------------------


def alignment_outcomes(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[ScoredPair],
    config: TrainConfig,
) -> list[float]:
    """Per pair: 1 when log π(chosen | conversation) > log π(rejected | conversation), else 0."""
    rows: list[Row] = []
    for pair in pairs:
        prompt = encode_prompt(tokenizer, pair.messages, config.max_prompt_tokens)
        for text in (pair.chosen, pair.rejected):
            rows.append(
                (
                    prompt,
                    encode_response(tokenizer, pair.messages, text, config.max_response_tokens),
                )
            )
    scores = score_sequences(model, rows, tokenizer.pad_token_id, config.score_batch_size)
    return [float(scores[i] > scores[i + 1]) for i in range(0, len(scores), 2)]


# --- the user's own preference pairs ----------------------------------------------------------


@dataclass
class PairScores:
    """Per held-out pair: log-ratios h = log πθ − log πref of chosen, rejected and base response."""

    h_chosen: list[float]
    h_rejected: list[float]
    h_base: list[float]
    ref_chosen: list[float]
    ref_rejected: list[float]

    def summary(self) -> dict[str, Any]:
        """Preference accuracies (implicit reward and plain likelihood) and base-anchor drift."""
        reward_hits = [float(w > r) for w, r in zip(self.h_chosen, self.h_rejected, strict=True)]
        likelihood_hits = [
            float(hw + rw > hr + rr)
            for hw, hr, rw, rr in zip(
                self.h_chosen, self.h_rejected, self.ref_chosen, self.ref_rejected, strict=True
            )
        ]
        return {
            "n": len(reward_hits),
            "preference_accuracy": mean(reward_hits),
            "preference_accuracy_stderr": stderr(reward_hits),
            "likelihood_accuracy": mean(likelihood_hits),
            "likelihood_hits": likelihood_hits,
            "anchor_logratio": mean(self.h_base),
            "anchor_logratio_stderr": stderr(self.h_base),
            "anchor_below_frac": mean([float(h < 0) for h in self.h_base]),
            "chosen_logratio": mean(self.h_chosen),
            "rejected_logratio": mean(self.h_rejected),
        }


def pair_scores(
    model: CausalLM, pairs: Sequence[EncodedPair], pad_token_id: int, batch_size: int
) -> PairScores:
    """Score encoded pairs (with base responses and reference log-probs) with the engine."""
    import torch

    h_w: list[float] = []
    h_l: list[float] = []
    h_b: list[float] = []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = list(pairs[start : start + batch_size])
            w, r, b, _, _ = pair_logratios(model, chunk, pad_token_id, True)
            assert b is not None
            h_w += w.tolist()
            h_l += r.tolist()
            h_b += b.tolist()
    refs = [p.ref_logps for p in pairs]
    return PairScores(h_w, h_l, h_b, [r[0] for r in refs if r], [r[1] for r in refs if r])


# --- rules on generated text ------------------------------------------------------------------

_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
_VOWELS = re.compile(r"[aeiouy]+")
FRIENDLY_MARKERS = (
    "!",
    "glad",
    "happy",
    "great",
    "love",
    "wonderful",
    "fun",
    "awesome",
    "hope",
    "friend",
    "enjoy",
    "delight",
    "amazing",
    "exciting",
    "sure",
    "of course",
    "thank",
)


def word_count(text: str) -> float:
    """Number of words (informativeness: concise ↔ thorough)."""
    return float(len(_WORD.findall(text)))


def _syllables(word: str) -> int:
    """Rough English syllable count (vowel groups, silent final e)."""
    groups = len(_VOWELS.findall(word.lower()))
    if word.lower().endswith("e") and groups > 1:
        groups -= 1
    return max(1, groups)


def reading_grade(text: str) -> float:
    """Flesch–Kincaid grade level (expertise: elementary ↔ expert); 0 for empty text."""
    words = _WORD.findall(text)
    if not words:
        return 0.0
    sentences = max(1, len(re.findall(r"[.!?]+", text)))
    syllables = sum(_syllables(w) for w in words)
    return 0.39 * len(words) / sentences + 11.8 * syllables / len(words) - 15.59


def friendliness(text: str) -> float:
    """Friendly markers (exclamations, warm words) per 100 words (style: friendly ↔ blunt)."""
    lowered = text.lower()
    hits = sum(lowered.count(marker) for marker in FRIENDLY_MARKERS)
    return 100.0 * hits / max(1.0, word_count(text))


RULES = {"word_count": word_count, "reading_grade": reading_grade, "friendliness": friendliness}
