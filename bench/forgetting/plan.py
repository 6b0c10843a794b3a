"""Sizes and hyperparameters of a benchmark run: `quick`, `full`, and the tiny one the test uses.

Budgets are planned from the machine's measured speeds (ENVIRONMENT.md: forward ≈ 440 tok/s,
LoRA step ≈ 200 tok/s on 2 CPU cores): a training step of 4 DSP pairs (prompt ≈ 45 + response
≤ 64 tokens) forwards ≈ 0.9k tokens for DPO and ≈ 1.3k for BAPO (the base response row).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from bench.forgetting.users import SliceSizes
from worker.training.config import TrainConfig


@dataclass(frozen=True)
class Plan:
    """What one benchmark run trains and measures."""

    mode: str
    dsp_domains: tuple[str, ...]
    dimensions: tuple[tuple[str, tuple[str, ...]], ...]  # (dimension, poles)
    sizes: SliceSizes
    steps: int
    learning_rate: float
    default_lambda: float  # the engine's default anchor weight
    sweep_lambdas: tuple[float, ...]  # BAPO anchor weights besides the default
    sweep_users: tuple[str, ...] | None  # users that get the whole sweep (None: all)
    selected_on_all_users: bool  # after the sweep, train the selected λ on every user
    # (set, questions): each is screened on the base; only sets clearly above chance score the
    # adapters. ARC-Challenge, TruthfulQA MC1 and HellaSwag measured at or near chance on this
    # model: they are screened on a small subset to document that.
    mc_sets: tuple[tuple[str, int], ...]
    min_z_above_chance: float  # keep a set when (base acc − chance) / stderr ≥ this
    hh_pairs_per_split: int
    gen_max_new_tokens: int  # generations for the text rules (dimension users, test prompts)
    train_overrides: dict[str, Any] = field(default_factory=dict)

    def train_config(self, seed: int, method: str, anchor_weight: float) -> TrainConfig:
        """The engine config of one run: identical for every method except method and λ."""
        values: dict[str, Any] = {
            "method": method,
            "anchor_weight": anchor_weight if method == "bapo" else TrainConfig.anchor_weight,
            "learning_rate": self.learning_rate,
            "max_steps": self.steps,
            "batch_size": 4,
            "lora_rank": 16,
            "lora_alpha": 32,
            "beta": 0.1,
            "seed": seed,
            "max_prompt_tokens": 192,
            "max_response_tokens": 64,
            "base_max_new_tokens": 64,
            "heldout_fraction": 0.0,  # the benchmark holds out by prompt itself
            "score_batch_size": 16,
            "base_batch_size": 16,  # generation only: larger batches generate faster on CPU
            **self.train_overrides,
        }
        return TrainConfig.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)


def quick_plan() -> Plan:
    """About 8 minutes on this machine (7.8 measured, cold cache): one DSP and one dimension user,
    DPO and BAPO.

    A smoke-scale run of the whole pipeline on real data: 8 steps on 16 pairs are too few for
    DPO to forget measurably, there is no λ sweep, and the small MC subsets are kept at a lower
    bar (1.5 standard errors above chance); the full mode is the measurement.
    """
    return Plan(
        mode="quick",
        dsp_domains=("literature",),
        dimensions=(("informativeness", ("concise",)),),
        sizes=SliceSizes(train=16, validation=4, test=8),
        steps=8,
        learning_rate=2e-3,
        default_lambda=TrainConfig.anchor_weight,
        sweep_lambdas=(),
        sweep_users=None,
        selected_on_all_users=False,
        mc_sets=(("arc_easy", 50), ("piqa", 30)),
        min_z_above_chance=1.5,
        hh_pairs_per_split=6,
        gen_max_new_tokens=32,
    )


def full_plan() -> Plan:
    """About 85 minutes on this machine (83 measured, cold cache): the 4 DSP users and one pole
    of each P-SOUPS dimension, DPO and BAPO (default λ) on each, and a λ sweep (0.01, 0.1, 3) on
    one DSP user.

    16 steps of 4 pairs = one epoch over 64 pairs, at learning rate 2e-3: at 1e-3 DPO's pooled
    knowledge loss (−2.9 ± 2.0 pp) was not beyond two standard errors. A training step takes
    ≈ 8–11 s and scoring an adapter ≈ 1.6 min on the 2-core machine (building the dimension users'
    pairs ≈ 7 min on a cold cache), which is what bounds the sizes. The at-chance MC sets are
    screened on small subsets only to document that they say nothing about forgetting.
    """
    return Plan(
        mode="full",
        dsp_domains=("academy", "business", "entertainment", "literature"),
        dimensions=(
            ("expertise", ("expert",)),
            ("informativeness", ("concise",)),
            ("style", ("blunt",)),
        ),
        sizes=SliceSizes(train=64, validation=12, test=24),
        steps=16,
        learning_rate=2e-3,
        default_lambda=TrainConfig.anchor_weight,
        sweep_lambdas=(0.01, 0.1, 3.0),
        sweep_users=("dsp:literature",),
        selected_on_all_users=False,
        mc_sets=(
            ("arc_easy", 120),
            ("piqa", 80),
            ("mmlu_marketing", 30),
            ("mmlu_high_school_psychology", 20),
            ("arc_challenge", 20),
            ("truthfulqa_mc1", 20),
            ("hellaswag", 20),
        ),
        min_z_above_chance=2.0,
        hh_pairs_per_split=15,
        gen_max_new_tokens=48,
    )


PLANS = {"quick": quick_plan, "full": full_plan}
