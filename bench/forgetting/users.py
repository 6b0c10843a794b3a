"""The benchmark's users: four DSP domain users and P-SOUPS-style preference-dimension users.

Every user's prompts are split (seeded, by prompt, so no prompt is in two slices) into train,
validation (λ selection) and test (reported numbers). Each user carries a plain-words record of
how its pairs were built.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bench.forgetting.datasets import DSP_DOMAINS, DSPRecord, seeded_sample
from foundation.model import CausalLM
from foundation.pairs import Messages, Pair
from foundation.train_config import TrainConfig
from worker.training.anchors import cached_generations
from worker.training.cache import KeyValueCache
from worker.training.judge import with_instruction

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SLICES = ("train", "validation", "test")

# The P-SOUPS preference prompts (Jang et al. 2023, "Personalized Soups"), dimension → two poles.
DIMENSIONS: dict[str, dict[str, str]] = {
    "expertise": {
        "elementary": "Generate a response that can be easily understood by an elementary "
        "school student.",
        "expert": "Generate a response that only a PhD Student in that specific field could "
        "understand.",
    },
    "informativeness": {
        "concise": "Generate a response that is concise and to the point, without being verbose.",
        "thorough": "Generate a response that is very informative, without missing any "
        "background information.",
    },
    "style": {
        "friendly": "Generate a response that is friendly, witty, funny, and humorous, like a "
        "close friend.",
        "blunt": "Generate a response in an unfriendly manner.",
    },
}
# The judge's instruction for each DSP user: the domain's style in plain words (written for this
# benchmark; DSP itself states domains only by name).
DSP_INSTRUCTIONS: dict[str, str] = {
    "academy": "Answer like an academic: formal, precise and grounded in scholarly knowledge, "
    "with technical terms where they fit.",
    "business": "Answer like a business professional: practical and focused on costs, value, "
    "customers and outcomes.",
    "entertainment": "Answer in an entertaining way: lively, playful and fun, with references "
    "to films, music or pop culture where they fit.",
    "literature": "Answer like a writer: expressive and vivid, with imagery and literary language.",
}
# Rule on generated text per dimension, and the pole whose rule value is higher.
DIMENSION_RULES: dict[str, tuple[str, str]] = {
    "expertise": ("reading_grade", "expert"),
    "informativeness": ("word_count", "thorough"),
    "style": ("friendliness", "friendly"),
}


@dataclass(frozen=True)
class SliceSizes:
    """Prompts per user in each slice."""

    train: int
    validation: int
    test: int

    @property
    def total(self) -> int:
        """All prompts a user needs."""
        return self.train + self.validation + self.test


@dataclass
class User:
    """One simulated user: its pairs per slice and how they were built."""

    name: str
    kind: str  # "dsp" | "dimension"
    construction: str
    slices: dict[str, list[Pair]]
    instruction: str = ""  # the user's preference in words: what the persona judge is told
    rule: str | None = None  # name in measures.RULES (dimension users)
    rule_sign: int = 0  # +1: the user prefers higher rule values; -1: lower
    facts: dict[str, Any] = field(default_factory=dict)

    def prompts(self, slice_name: str) -> list[Messages]:
        """The chat prompts of one slice."""
        return [pair.messages for pair in self.slices[slice_name]]

    def describe(self) -> dict[str, Any]:
        """JSON-ready record (construction, slice sizes, facts)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "construction": self.construction,
            "slice_sizes": {name: len(pairs) for name, pairs in self.slices.items()},
            "instruction": self.instruction,
            "test_prompts": [pair.messages[-1]["content"] for pair in self.slices.get("test", [])],
            "rule": self.rule,
            "rule_sign": self.rule_sign,
            **self.facts,
        }


def _split(items: Sequence[Any], sizes: SliceSizes) -> dict[str, list[Any]]:
    """Consecutive train / validation / test slices of an already shuffled list."""
    if len(items) < sizes.total:
        raise ValueError(f"need {sizes.total} prompts, have {len(items)}")
    bounds = (0, sizes.train, sizes.train + sizes.validation, sizes.total)
    return {name: list(items[bounds[i] : bounds[i + 1]]) for i, name in enumerate(SLICES)}


def dsp_users(
    records: Sequence[DSPRecord], domains: Sequence[str], sizes: SliceSizes, seed: int
) -> list[User]:
    """DSP domain users; all share one seeded query split (so base answers are shared too)."""
    chosen_records = seeded_sample(records, sizes.total, seed, "dsp-queries")
    by_slice = _split(chosen_records, sizes)
    return [_dsp_user(domain, by_slice, seed) for domain in domains]


def _dsp_user(domain: str, by_slice: dict[str, list[DSPRecord]], seed: int) -> User:
    """Chosen = the domain's response; rejected = one other domain's response (seeded rotation)."""
    others = [d for d in DSP_DOMAINS if d != domain]
    rng = random.Random(f"{seed}:dsp-rejected:{domain}")
    slices: dict[str, list[Pair]] = {}
    rejected_from: dict[str, int] = dict.fromkeys(others, 0)
    for name, records in by_slice.items():
        slices[name] = []
        for record in records:
            other = rng.choice(others)
            rejected_from[other] += 1
            messages = [{"role": "user", "content": record.query}]
            slices[name].append(Pair(messages, record.responses[domain], record.responses[other]))
    construction = (
        f"DSP test queries (Alpaca instructions). chosen = the '{domain}' response, rejected = "
        f"the response of one other domain ({', '.join(others)}) picked at random (seeded) per "
        "query; the prompt is the query alone as one user turn."
    )
    return User(
        f"dsp:{domain}",
        "dsp",
        construction,
        slices,
        instruction=DSP_INSTRUCTIONS[domain],
        facts={"rejected_domain_counts": rejected_from},
    )


def instructed(prompt: str, instruction: str) -> Messages:
    """The prompt with a preference instruction appended (to build pairs; the judge's form)."""
    return with_instruction([{"role": "user", "content": prompt}], instruction)


def pole_responses(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    instruction: str,
    *,
    identity: str,
    cache: KeyValueCache,
    config: TrainConfig,
) -> list[str]:
    """The base model's answers under an instruction, decoded and cached like base responses."""
    messages = [instructed(prompt, instruction) for prompt in prompts]
    answers = cached_generations(model, tokenizer, messages, config, identity, cache)[0]
    return [answer.text for answer in answers]


def dimension_users(
    dimension: str,
    poles: Sequence[str],
    prompts: Sequence[str],
    answers: dict[str, list[str]],
    sizes: SliceSizes,
) -> list[User]:
    """Both-pole users of one dimension from the base model's answers under each pole's prompt.

    `prompts` is already shuffled; `answers[pole][i]` answers prompts[i]. Prompts whose two
    answers are identical (no preference to learn) are skipped before slicing.
    """
    pole_a, pole_b = DIMENSIONS[dimension]
    usable = [
        (p, a, b)
        for p, a, b in zip(prompts, answers[pole_a], answers[pole_b], strict=True)
        if a.strip() and b.strip() and a.strip() != b.strip()
    ]
    by_slice = _split(usable, sizes)
    rule, high_pole = DIMENSION_RULES[dimension]
    users = []
    for pole in poles:
        other = pole_b if pole == pole_a else pole_a
        slices = {
            name: [
                Pair([{"role": "user", "content": p}], *((a, b) if pole == pole_a else (b, a)))
                for p, a, b in rows
            ]
            for name, rows in by_slice.items()
        }
        construction = (
            f"P-SOUPS-style '{dimension}' user preferring '{pole}' over '{other}'. For each "
            "prompt (the Koala/P-SOUPS eval prompts topped up with DSP queries, seeded order) "
            "the base model answered greedily twice, with the P-SOUPS instruction of each pole "
            f"appended to the prompt ('{DIMENSIONS[dimension][pole]}' vs "
            f"'{DIMENSIONS[dimension][other]}'). "
            f"chosen = the '{pole}' answer, rejected = the '{other}' answer; the training prompt "
            "is the plain prompt, without any instruction."
        )
        users.append(
            User(
                f"{dimension}:{pole}",
                "dimension",
                construction,
                slices,
                DIMENSIONS[dimension][pole],
                rule,
                1 if pole == high_pole else -1,
                facts={"prompts_with_identical_answers_skipped": len(prompts) - len(usable)},
            )
        )
    return users
