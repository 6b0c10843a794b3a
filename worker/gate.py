"""The retention gate: may a new adapter become the user's active one?

It is measured with the engine (worker.training.retention) and decided here from the settings.
The adapter fails when any of these holds:

* **Knowledge.** Its MC accuracy change d (adapter − base, same questions) is below
  min(−GATE_RETENTION_Z · se, GATE_MIN_RETENTION_DELTA), se being the paired standard error: the
  drop must be beyond noise (z standard errors) *and* beyond a practical floor, so that losing a
  handful of questions out of hundreds never fails an adapter that changes little else.
* **Degenerate answers.** Its share of degenerate answers on the general prompts exceeds the base
  model's by more than GATE_MAX_DEGENERATE_INCREASE, whatever its MC score.
* **Anchor drift.** Its mean base-anchor log-ratio is below GATE_MAX_ANCHOR_DRIFT minus the drift
  the job's anchor allows by design (δ of the `hinge_tolerance` form, 0 for the others).

The base model's MC outcomes and judged answers are cached in the `base_responses` table (keys
prefixed `gate-`, see worker.training.retention), so a job computes only the adapter's side.
Whether the cache was warm is not in the job's metrics (users see only their own facts); the
lookups count in the operators' `bapo_training_cache_lookups_total{cache="gate_baseline"}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from foundation.train_config import TrainConfig
from worker.caches import gate_baseline_cache
from worker.training.retention import DegeneracyCheck, KnowledgeComparison

FLOAT_SLACK = 1e-9  # fractions and thresholds compared with this much rounding allowed


@dataclass(frozen=True)
class GateMeasures:
    """The gate's two measurements of one adapter."""

    knowledge: KnowledgeComparison
    degeneracy: DegeneracyCheck

    def to_json(self) -> dict[str, Any]:
        """The job's `retention` metrics: the MC figures, with the degeneracy check as `fluency`."""
        return {**self.knowledge.to_json(), "fluency": self.degeneracy.to_json()}


@dataclass(frozen=True)
class GateVerdict:
    """Whether a new adapter may become active, why not, and the figures it was judged on."""

    passed: bool
    reason: str | None
    retention_delta: float | None
    anchor_logratio: float | None
    retention_stderr: float | None = None
    retention_threshold: float | None = None
    retention_z: float | None = None
    mc_questions: int | None = None
    base_accuracy: float | None = None
    adapter_accuracy: float | None = None
    degenerate_fraction: float | None = None
    base_degenerate_fraction: float | None = None
    max_degenerate_fraction: float | None = None
    gate_prompts: int | None = None


def measure_retention(
    settings: Settings, factory: sessionmaker[Session], model_path: Path, adapter_dir: Path
) -> GateMeasures:
    """Knowledge and degenerate answers of the adapter (loaded back from its folder) vs the base
    model, on the gate's questions and prompts, the base's figures through the database cache."""
    from peft import PeftModel

    from foundation.model import load_model, load_tokenizer, model_identity
    from worker.training.evaluate import general_mc_path, load_mc
    from worker.training.retention import (
        check_degeneracy,
        compare_knowledge,
        general_prompts_path,
        load_prompts,
    )

    questions = load_mc(settings.gate_mc_file or general_mc_path())[: settings.gate_mc_limit]
    prompts = load_prompts(general_prompts_path())[: settings.gate_prompt_limit]
    tokenizer = load_tokenizer(model_path)
    model = PeftModel.from_pretrained(load_model(model_path), str(adapter_dir)).eval()
    cache = gate_baseline_cache(factory)
    identity = model_identity(model_path, next(model.parameters()).device)
    knowledge = compare_knowledge(model, tokenizer, questions, identity, cache)
    degeneracy = check_degeneracy(
        model, tokenizer, prompts, identity, cache, settings.gate_degenerate_nll_margin
    )
    return GateMeasures(knowledge, degeneracy)


def retention_threshold(settings: Settings, stderr: float) -> float:
    """The accuracy change below which the knowledge check fails: min(−z·se, floor)."""
    return min(-settings.gate_retention_z * stderr, settings.gate_min_retention_delta)


def anchor_allowance(config: TrainConfig) -> float:
    """Drift (nats) a job's anchor allows by design: δ for `hinge_tolerance`, else 0."""
    return config.anchor_tolerance if config.anchor_form == "hinge_tolerance" else 0.0


def gate_verdict(
    settings: Settings,
    measures: GateMeasures,
    anchor: float | None,
    anchor_allowance: float = 0.0,
) -> GateVerdict:
    """Pass when knowledge, degenerate answers and anchor drift are all within the settings.

    `anchor_allowance` is the drift (nats) the job's anchor leaves free on purpose
    (`anchor_allowance(config)`); only drift beyond it counts against GATE_MAX_ANCHOR_DRIFT.
    """
    k, d = measures.knowledge, measures.degeneracy
    threshold = retention_threshold(settings, k.stderr)
    most_degenerate = d.base_fraction + settings.gate_max_degenerate_increase
    reasons = []
    if k.delta < threshold - FLOAT_SLACK:
        reasons.append(
            f"knowledge retention {k.delta:+.3f} ± {k.stderr:.3f} (paired stderr, {k.n} "
            f"questions) is below {threshold:+.3f} = min(−{settings.gate_retention_z:g}·stderr, "
            f"{settings.gate_min_retention_delta:+.3f}) (GATE_RETENTION_Z, "
            "GATE_MIN_RETENTION_DELTA)"
        )
    if d.adapter_fraction > most_degenerate + FLOAT_SLACK:
        reasons.append(
            f"degenerate answers on {d.adapter_degenerate} of {d.prompts} general prompts "
            f"({d.adapter_fraction:.2f}), more than the base model's {d.base_fraction:.2f} + "
            f"{settings.gate_max_degenerate_increase:.2f} (GATE_MAX_DEGENERATE_INCREASE)"
        )
    drift_floor = settings.gate_max_anchor_drift - anchor_allowance
    if anchor is not None and not anchor >= drift_floor:
        allowed = f" − the anchor's tolerance {anchor_allowance:g}" if anchor_allowance else ""
        reasons.append(
            f"base-anchor log-ratio {anchor:.3f} nats is below {drift_floor:.3f} = "
            f"{settings.gate_max_anchor_drift:.3f} (GATE_MAX_ANCHOR_DRIFT){allowed}"
        )
    return GateVerdict(
        passed=not reasons,
        reason="; ".join(reasons) or None,
        retention_delta=k.delta,
        anchor_logratio=anchor,
        retention_stderr=k.stderr,
        retention_threshold=threshold,
        retention_z=settings.gate_retention_z,
        mc_questions=k.n,
        base_accuracy=k.base_accuracy,
        adapter_accuracy=k.adapter_accuracy,
        degenerate_fraction=d.adapter_fraction,
        base_degenerate_fraction=d.base_fraction,
        max_degenerate_fraction=min(most_degenerate, 1.0),
        gate_prompts=d.prompts,
    )
