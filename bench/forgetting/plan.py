"""Sizes, grids and hyperparameters of a benchmark run: `full`, `quick`, and the test's tiny one.

A run has three phases (bench/README.md states the rules that pick between them):
1. **DPO tuning** — DPO on a grid of learning rate × steps, on the selection users, one seed,
   judged on validation prompts;
2. **BAPO variants** — each anchor form over its own knob (λ, δ) at the tuned DPO's learning
   rate and steps (the same budget), same users and judging;
3. **final** — the tuned DPO and the chosen BAPO default on every user, with the final seeds,
   judged once on test prompts with the full knowledge set.

Budgets come from the machine's measured speeds (2 CPU cores: a BAPO step of 4 pairs ≈ 10 s,
DPO ≈ 7 s; judging an adapter on validation ≈ 1.5 min, on test with 420 MC questions ≈ 3.5 min).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from bench.forgetting.users import SliceSizes
from foundation.train_config import TrainConfig

PHASES = ("dpo_tuning", "bapo_variants", "final")


@dataclass(frozen=True)
class Setting:
    """What one training run varies: method, learning rate, steps and the anchor's form/knob."""

    method: str  # "dpo" | "bapo"
    learning_rate: float
    steps: int
    anchor_form: str = "hinge"
    anchor_weight: float = 0.0
    anchor_tolerance: float = 0.0

    @property
    def key(self) -> str:
        """Stable id, e.g. 'dpo lr=0.001 steps=32' or 'bapo:replay λ=1 lr=0.001 steps=32'."""
        budget = f"lr={self.learning_rate:g} steps={self.steps}"
        if self.method == "dpo":
            return f"dpo {budget}"
        return f"bapo:{self.anchor_form} {self.knob} {budget}"

    @property
    def knob(self) -> str:
        """The anchor's own setting, e.g. 'λ=1' or 'λ=1 δ=8'."""
        text = f"λ={self.anchor_weight:g}"
        if self.anchor_form == "hinge_tolerance":
            text += f" δ={self.anchor_tolerance:g}"
        return text

    @property
    def label(self) -> str:
        """Short human label, e.g. 'DPO' or 'BAPO replay λ=1'."""
        return "DPO" if self.method == "dpo" else f"BAPO {self.anchor_form} {self.knob}"

    def at_budget(self, learning_rate: float, steps: int) -> Setting:
        """The same anchor at another learning rate and step count."""
        return dataclasses.replace(self, learning_rate=learning_rate, steps=steps)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Setting:
        """From its to_dict form."""
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)


def bapo(form: str, weight: float, tolerance: float = 0.0) -> Setting:
    """A BAPO anchor setting (budget filled in after DPO tuning)."""
    return Setting("bapo", 0.0, 0, form, weight, tolerance)


@dataclass(frozen=True)
class Plan:
    """What one benchmark run trains and measures."""

    mode: str
    dsp_domains: tuple[str, ...]
    dimensions: tuple[tuple[str, tuple[str, ...]], ...]  # (dimension, poles)
    sizes: SliceSizes
    selection_users: tuple[str, ...]
    dpo_learning_rates: tuple[float, ...]
    dpo_steps: tuple[int, ...]
    bapo_grid: tuple[Setting, ...]  # anchor settings; learning rate and steps come from DPO
    selection_seeds: tuple[int, ...]
    final_seeds: tuple[int, ...]
    # (set, questions in the final measurement): each set is screened on the base model and
    # only sets clearly above chance are kept; selection scores a disjoint, smaller subset.
    mc_sets: tuple[tuple[str, int], ...]
    selection_mc_fraction: float
    min_z_above_chance: float  # keep a set when (base acc − chance) / stderr ≥ this
    hh_pairs_per_split: int  # final phase only
    gen_max_new_tokens: int  # greedy answers judged on validation / test prompts
    train_overrides: dict[str, Any] = field(default_factory=dict)

    def dpo_grid(self) -> list[Setting]:
        """Phase 1 settings: every learning rate × steps."""
        return [
            Setting("dpo", lr, steps) for lr in self.dpo_learning_rates for steps in self.dpo_steps
        ]

    def train_config(self, seed: int, setting: Setting) -> TrainConfig:
        """The engine config of one run: only the Setting's fields differ between runs."""
        values: dict[str, Any] = {
            "method": setting.method,
            "anchor_form": setting.anchor_form,
            "anchor_weight": setting.anchor_weight if setting.method == "bapo" else 0.0,
            "anchor_tolerance": setting.anchor_tolerance,
            "learning_rate": setting.learning_rate,
            "max_steps": setting.steps,
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
        return TrainConfig.parse(values)

    def generation_config(self) -> TrainConfig:
        """The decoding settings of judged answers (greedy, gen_max_new_tokens), for the cache."""
        return dataclasses.replace(
            self.train_config(0, Setting("dpo", 1e-3, 1)),
            base_max_new_tokens=self.gen_max_new_tokens,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)


# Each anchor form with two values of its knob (module doc of worker/training/loss.py):
# the summed hinge at the old default and ten times weaker; the per-token hinge around the
# weight where it matches DPO's per-token pull (β σ ≈ 0.05 × n_b ≈ 64 tokens → λ ≈ 3); the summed
# hinge with δ = 8 and 32 nats of free drift; DPO + replay at the two weights TRL-style recipes use.
FULL_BAPO_GRID = (
    bapo("hinge", 0.1),
    bapo("hinge", 1.0),
    bapo("hinge_per_token", 1.0),
    bapo("hinge_per_token", 4.0),
    bapo("hinge_tolerance", 1.0, 8.0),
    bapo("hinge_tolerance", 1.0, 32.0),
    bapo("replay", 0.3),
    bapo("replay", 1.0),
)


def full_plan() -> Plan:
    """The measurement: 10 users (4 DSP, both poles of 3 P-SOUPS dimensions), 2 final seeds.

    Selection on 3 users (one DSP, two conflicting poles) with one seed: 6 DPO settings and 8
    BAPO settings each (≈ 3 h here); final: tuned DPO and the chosen default on 10 users × 2
    seeds (40 runs, ≈ 3–4 h). Every finished run is recorded at once and a restart skips it.
    """
    return Plan(
        mode="full",
        dsp_domains=("academy", "business", "entertainment", "literature"),
        dimensions=(
            ("expertise", ("elementary", "expert")),
            ("informativeness", ("concise", "thorough")),
            ("style", ("friendly", "blunt")),
        ),
        sizes=SliceSizes(train=64, validation=12, test=24),
        selection_users=("dsp:literature", "informativeness:concise", "style:blunt"),
        dpo_learning_rates=(5e-4, 1e-3, 2e-3),
        dpo_steps=(16, 32),
        bapo_grid=FULL_BAPO_GRID,
        selection_seeds=(0,),
        final_seeds=(0, 1),
        mc_sets=(("arc_easy", 260), ("piqa", 160)),
        selection_mc_fraction=0.4,
        min_z_above_chance=2.0,
        hh_pairs_per_split=15,
        gen_max_new_tokens=64,
    )


def quick_plan() -> Plan:
    """A smoke run of every phase on real data (≤ 15 min here): 2 users, tiny grids, 1 seed.

    Too small to measure anything: 6 steps on 16 pairs, 6 test prompts, 60 MC questions kept at
    any z; the full mode is the measurement.
    """
    return Plan(
        mode="quick",
        dsp_domains=("literature",),
        dimensions=(("informativeness", ("concise",)),),
        sizes=SliceSizes(train=16, validation=4, test=6),
        selection_users=("dsp:literature",),
        dpo_learning_rates=(1e-3, 2e-3),
        dpo_steps=(6,),
        bapo_grid=(bapo("hinge_per_token", 4.0), bapo("replay", 1.0)),
        selection_seeds=(0,),
        final_seeds=(0,),
        mc_sets=(("arc_easy", 40), ("piqa", 20)),
        selection_mc_fraction=0.5,
        min_z_above_chance=-100.0,  # keep every set: too few questions to screen
        hh_pairs_per_split=4,
        gen_max_new_tokens=32,
    )


PLANS = {"quick": quick_plan, "full": full_plan}
