"""What the retention gate measures: knowledge kept (a paired MC comparison) and degenerate answers.

Knowledge. The adapter and the base model answer the same multiple-choice questions
(evaluate.mc_hits, summed log-likelihood). Per question d_i = adapter_i − base_i ∈ {−1, 0, 1}; the
change in accuracy is mean(d) and its paired standard error is sd(d)/√n. Questions both models get
right (or both wrong) add no noise, so this is much tighter than two independent accuracies.

Degenerate answers. On the general prompts shipped with the engine (general_prompts.jsonl) the
adapter and the base model answer greedily (FLUENCY_MAX_NEW_TOKENS tokens) and the base model
judges both (judge.fluency): an answer is degenerate when it is empty, repeats itself, or its NLL
per token is more than `nll_margin` above the highest NLL among the base's own answers. Why a
margin above the base's maximum and not the base answers' 95th percentile: greedy answers are the
base's most likely text (0.4–1.1 nats/token for the bundled model on these prompts), fluent answers
written differently score 1.2–3.4 and word salad about 6, so a percentile of greedy answers would
call every answer that moved toward a user broken.

The base model's figures belong to (base model, question or prompt, scoring settings), not to an
adapter: they are read from a cache and computed only when missing. Keys (values: JSON text):
  MC outcome:  f"gate-mc:{identity}:{sha256(question)[:32]}:{MC_MAX_PROMPT_TOKENS}"
               f":{MC_MAX_CHOICE_TOKENS}:g{GATE_CACHE_FORMAT}"
  base answer: f"gate-answer:{identity}:{prompt_hash}:{FLUENCY_MAX_NEW_TOKENS}"
               f":{JUDGE_MAX_PROMPT_TOKENS}:g{GATE_CACHE_FORMAT}:{FLUENCY_RULE}"
One key per question (not per file) so that a GATE_MC_LIMIT, or questions added to a file, reuse
every outcome already known. Torch and the model code are imported inside the functions: the
worker's verdict and its tests read these figures without loading them.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from foundation.model import CausalLM
    from foundation.pairs import Messages
    from worker.training.anchors import Generation
    from worker.training.cache import KeyValueCache
    from worker.training.evaluate import MCQuestion

GATE_CACHE_FORMAT = 1
FLUENCY_MAX_NEW_TOKENS = 48


class PromptFileError(ValueError):
    """A general-prompts file is unreadable or not jsonl of {"prompt": ...}."""


@dataclass(frozen=True)
class KnowledgeComparison:
    """Adapter vs base MC accuracy on the same n questions, with the paired standard error."""

    n: int
    base_accuracy: float
    adapter_accuracy: float
    delta: float
    stderr: float
    delta_norm: float = 0.0
    # base outcomes computed by this call (0: all from the cache); not in to_json: whether the
    # shared cache was warm is not a user's fact (operators see it in /metrics)
    base_computed: int = 0

    def to_json(self) -> dict[str, Any]:
        """JSON-ready figures (`base`/`adapter`/`delta` as knowledge_retention() names them)."""
        return {
            "questions": self.n,
            "base": {"accuracy": self.base_accuracy, "n": self.n},
            "adapter": {"accuracy": self.adapter_accuracy, "n": self.n},
            "delta": self.delta,
            "delta_stderr": self.stderr,
            "delta_norm": self.delta_norm,
        }


@dataclass(frozen=True)
class DegeneracyCheck:
    """How many of the general prompts got a degenerate answer from the adapter and the base."""

    prompts: int
    adapter_degenerate: int
    base_degenerate: int
    nll_bound: float
    adapter_mean_nll: float = 0.0
    base_mean_nll: float = 0.0
    base_computed: int = 0  # base answers generated and judged by this call

    @property
    def adapter_fraction(self) -> float:
        """Share of the adapter's answers that are degenerate."""
        return self.adapter_degenerate / self.prompts if self.prompts else 0.0

    @property
    def base_fraction(self) -> float:
        """Share of the base model's answers that are degenerate."""
        return self.base_degenerate / self.prompts if self.prompts else 0.0

    def to_json(self) -> dict[str, Any]:
        """JSON-ready figures."""
        return {
            "prompts": self.prompts,
            "max_new_tokens": FLUENCY_MAX_NEW_TOKENS,
            "adapter_degenerate_fraction": self.adapter_fraction,
            "base_degenerate_fraction": self.base_fraction,
            "nll_bound": self.nll_bound,
            "adapter_mean_nll": self.adapter_mean_nll,
            "base_mean_nll": self.base_mean_nll,
        }


def paired_difference(base: Sequence[float], adapter: Sequence[float]) -> tuple[float, float]:
    """Mean of the per-item differences adapter − base and its standard error sd/√n.

    sd is the sample standard deviation (n − 1); with fewer than two items the error is 0.
    """
    diffs = [a - b for a, b in zip(adapter, base, strict=True)]
    n = len(diffs)
    if n == 0:
        return 0.0, 0.0
    mean = sum(diffs) / n
    if n < 2:
        return mean, 0.0
    variance = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return mean, math.sqrt(variance / n)


def general_prompts_path() -> Path:
    """The general prompts shipped with the engine (jsonl: {"id", "prompt"} per line)."""
    resource = importlib.resources.files("worker.training.resources") / "general_prompts.jsonl"
    return Path(str(resource))


def load_prompts(path: Path) -> list[Messages]:
    """Each line's `prompt` as a one-turn chat."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        prompts = [str(json.loads(line)["prompt"]) for line in lines if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise PromptFileError(f"{path}: not jsonl of {{'prompt': ...}} ({exc})") from exc
    if not prompts or not all(p.strip() for p in prompts):
        raise PromptFileError(f"{path}: no prompts, or an empty one")
    return [[{"role": "user", "content": prompt}] for prompt in prompts]


# --- knowledge --------------------------------------------------------------------------------


def mc_outcome_key(identity: str, question: MCQuestion) -> str:
    """Cache key of the base model's outcome on one question under the MC scoring settings."""
    from worker.training.evaluate import MC_MAX_CHOICE_TOKENS, MC_MAX_PROMPT_TOKENS

    canonical = json.dumps(
        [question.question, list(question.choices), question.answer_index], ensure_ascii=False
    )
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:32]
    scoring = f"{MC_MAX_PROMPT_TOKENS}:{MC_MAX_CHOICE_TOKENS}:g{GATE_CACHE_FORMAT}"
    return f"gate-mc:{identity}:{digest}:{scoring}"


def compare_knowledge(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    questions: list[MCQuestion],
    identity: str,
    cache: KeyValueCache,
    batch_size: int = 16,
) -> KnowledgeComparison:
    """The PEFT model's MC outcomes against the base model's (adapter disabled, cached)."""
    from worker.training.evaluate import mc_hits

    hits, hits_norm = mc_hits(model, tokenizer, questions, batch_size)
    base, base_norm, computed = base_mc_hits(
        model, tokenizer, questions, identity, cache, batch_size
    )
    delta, stderr = paired_difference(base, hits)
    n = len(questions)
    return KnowledgeComparison(
        n=n,
        base_accuracy=sum(base) / n if n else 0.0,
        adapter_accuracy=sum(hits) / n if n else 0.0,
        delta=delta,
        stderr=stderr,
        delta_norm=paired_difference(base_norm, hits_norm)[0],
        base_computed=computed,
    )


def base_mc_hits(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    questions: list[MCQuestion],
    identity: str,
    cache: KeyValueCache,
    batch_size: int = 16,
) -> tuple[list[float], list[float], int]:
    """The base model's per-question correctness (summed, normalised) and how many were computed."""
    from worker.training.anchors import reference_mode
    from worker.training.evaluate import mc_hits

    keys = [mc_outcome_key(identity, q) for q in questions]
    found = {k: _decoded(v) for k, v in cache.get_many(sorted(set(keys))).items()}
    missing = {k: q for k, q in zip(keys, questions, strict=True) if k not in found}
    if missing:
        with reference_mode(model):
            hits, norm = mc_hits(model, tokenizer, list(missing.values()), batch_size)
        fresh = {k: {"hit": h, "hit_norm": m} for k, h, m in zip(missing, hits, norm, strict=True)}
        cache.put_many({k: json.dumps(v) for k, v in fresh.items()})
        found.update(fresh)
    return (
        [float(found[k]["hit"]) for k in keys],
        [float(found[k]["hit_norm"]) for k in keys],
        len(missing),
    )


def _decoded(value: Any) -> Any:
    """A cached value: JSON text (how the database stores it) or the object itself."""
    return json.loads(value) if isinstance(value, str) else value


# --- degenerate answers -----------------------------------------------------------------------


def answer_key(identity: str, messages: Messages) -> str:
    """Cache key of the base model's judged greedy answer to one general prompt."""
    from foundation.pairs import prompt_hash
    from worker.training.judge import FLUENCY_RULE, JUDGE_MAX_PROMPT_TOKENS

    settings = f"{FLUENCY_MAX_NEW_TOKENS}:{JUDGE_MAX_PROMPT_TOKENS}:g{GATE_CACHE_FORMAT}"
    settings += f":{FLUENCY_RULE}"
    return f"gate-answer:{identity}:{prompt_hash(messages)}:{settings}"


def check_degeneracy(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Messages],
    identity: str,
    cache: KeyValueCache,
    nll_margin: float,
    batch_size: int = 16,
) -> DegeneracyCheck:
    """Degenerate answers of the PEFT model vs the base model's (cached), judged by the base."""
    from worker.training.anchors import generate_answers, reference_mode
    from worker.training.judge import fluency, is_degenerate

    base_answers, base_nll, computed = base_judged_answers(
        model, tokenizer, prompts, identity, cache, batch_size
    )
    bound = max(base_nll) + nll_margin
    answers = generate_answers(model, tokenizer, prompts, FLUENCY_MAX_NEW_TOKENS, batch_size)
    with reference_mode(model):
        judged = fluency(
            model, tokenizer, prompts, [(a.text, a.token_ids) for a in answers], bound, batch_size
        )
    base_flags = [
        is_degenerate(a.text, a.token_ids, nll, bound)
        for a, nll in zip(base_answers, base_nll, strict=True)
    ]
    return DegeneracyCheck(
        prompts=len(prompts),
        adapter_degenerate=sum(judged.degenerate),
        base_degenerate=sum(base_flags),
        nll_bound=bound,
        adapter_mean_nll=judged.mean_nll,
        base_mean_nll=sum(base_nll) / len(base_nll),
        base_computed=computed,
    )


def base_judged_answers(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Messages],
    identity: str,
    cache: KeyValueCache,
    batch_size: int = 16,
) -> tuple[list[Generation], list[float], int]:
    """The base model's greedy answers, their NLL under it, and how many were computed now."""
    from worker.training.anchors import Generation, generate_answers, reference_mode
    from worker.training.judge import fluency

    if not prompts:
        raise ValueError("the degeneracy check needs at least one prompt")
    keys = [answer_key(identity, messages) for messages in prompts]
    found = {k: _decoded(v) for k, v in cache.get_many(sorted(set(keys))).items()}
    missing = {k: m for k, m in zip(keys, prompts, strict=True) if k not in found}
    if missing:
        todo = list(missing.values())
        with reference_mode(model):
            answers = generate_answers(model, tokenizer, todo, FLUENCY_MAX_NEW_TOKENS, batch_size)
            pairs = [(a.text, a.token_ids) for a in answers]
            nll = fluency(model, tokenizer, todo, pairs, batch_size=batch_size).nll
        fresh = {
            k: {**a.to_json(), "nll": value}
            for k, a, value in zip(missing, answers, nll, strict=True)
        }
        cache.put_many({k: json.dumps(v) for k, v in fresh.items()})
        found.update(fresh)
    generations = [Generation.from_json(found[k]) for k in keys]
    return generations, [float(found[k]["nll"]) for k in keys], len(missing)
