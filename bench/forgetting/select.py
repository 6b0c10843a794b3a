"""The benchmark's rules, applied to recorded runs: tune DPO, trace the frontier, pick BAPO's
default (validation only), and check the goal on the final test runs.

Rules (stated in bench/README.md before the test run):
* A setting is **fluent** when, pooled over its runs, the share of degenerate answers is at most
  the base model's share on the same prompts + FLUENCY_MARGIN.
* **Tuned DPO** = the fluent DPO setting with the largest mean validation persona movement (none
  fluent: the one with the fewest degenerate answers).
* **BAPO default** = among fluent BAPO settings whose validation movement is ≥ MOVEMENT_GOAL × the
  tuned DPO's, the one with the largest knowledge change (least forgetting); if none moves that
  far, the fluent setting with the largest movement whose knowledge loss is ≤ LOSS_GOAL × DPO's;
  else the fluent setting with the largest movement. Ties keep the grid's order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bench.forgetting.measures import mean, stderr
from bench.forgetting.plan import Setting
from bench.forgetting.runner import FLUENCY_MARGIN

Record = dict[str, Any]
MOVEMENT_GOAL = 0.8  # BAPO's persona movement ≥ 0.8 × tuned DPO's ...
LOSS_GOAL = 1 / 3  # ... with at most a third of its knowledge loss ...
MIN_USERS, MIN_SEEDS = 10, 2  # ... on at least 10 users × 2 seeds
EMPTY_GOAL: Record = {
    "movement_ratio": None,
    "knowledge_loss_ratio": None,
    "fluency_ok": None,
    "dpo_forgets": None,
    "users": 0,
    "seeds": 0,
    "met": False,
}


def by_setting(runs: Sequence[Record], phases: Sequence[str]) -> dict[str, list[Record]]:
    """Runs of the given phases grouped by setting key, in the order first seen."""
    groups: dict[str, list[Record]] = {}
    for run in runs:
        if run["phase"] in phases:
            groups.setdefault(run["setting_key"], []).append(run)
    return groups


def point(runs: Sequence[Record]) -> Record:
    """One setting's pooled figures: persona movement, fluency, knowledge, anchor drift."""
    moves = [m for r in runs for m in r["persona"]["moves"]]
    degenerate = [d for r in runs for d in r["fluency"]["degenerate"]]
    base_degenerate = [d for r in runs for d in r["fluency"]["base_degenerate"]]
    knowledge = [r["knowledge"]["pooled"]["delta"] for r in runs]
    rules = [r["rule"]["toward_user"] for r in runs if "rule" in r]
    degenerate_fraction, base_fraction = mean(degenerate), mean(base_degenerate)
    return {
        "setting": runs[0]["setting"],
        "setting_key": runs[0]["setting_key"],
        "label": runs[0]["label"],
        "users": sorted({r["user"] for r in runs}),
        "seeds": sorted({r["seed"] for r in runs}),
        "runs": len(runs),
        "movement": mean(moves),
        "movement_stderr": (
            clustered_stderr(runs, lambda r: r["persona"]["movement"])
            if len({r["user"] for r in runs}) > 1
            else stderr(moves)  # one user: the prompts are the units
        ),
        "win_rate": mean([r["persona"]["win_rate"] for r in runs]),
        "mean_nll": mean([r["fluency"]["mean_nll"] for r in runs]),
        "base_mean_nll": mean([r["fluency"]["base_mean_nll"] for r in runs]),
        "degenerate_fraction": degenerate_fraction,
        "base_degenerate_fraction": base_fraction,
        "fluent": degenerate_fraction <= base_fraction + FLUENCY_MARGIN,
        "knowledge_delta": mean(knowledge),
        "knowledge_delta_stderr": (
            clustered_stderr(runs, lambda r: r["knowledge"]["pooled"]["delta"])
            if len({r["user"] for r in runs}) > 1
            else mean([r["knowledge"]["pooled"]["delta_stderr"] for r in runs])  # per question
        ),
        "knowledge_delta_stderr_questions": mean(
            [r["knowledge"]["pooled"]["delta_stderr"] for r in runs]
        ),
        "anchor_logratio": mean([r["preference"]["anchor_logratio"] for r in runs]),
        "preference_accuracy": mean([r["preference"]["preference_accuracy"] for r in runs]),
        "rule_toward_user": mean(rules) if rules else None,
        "alignment_delta": (
            mean([r["alignment"]["pooled"]["delta"] for r in runs])
            if all("alignment" in r for r in runs)
            else None
        ),
    }


def clustered_stderr(runs: Sequence[Record], value: Any) -> float:
    """Stderr of the mean of value(run), clustered by user (users are the independent units)."""
    per_user: dict[str, list[float]] = {}
    for run in runs:
        per_user.setdefault(run["user"], []).append(float(value(run)))
    return stderr([mean(v) for v in per_user.values()])


def tune_dpo(runs: Sequence[Record]) -> Record:
    """The DPO tuning table (validation) and the tuned setting."""
    points = [point(group) for group in by_setting(runs, ["dpo_tuning"]).values()]
    if not points:
        return {"selected": None, "points": []}
    fluent = [p for p in points if p["fluent"]]
    if fluent:
        chosen = max(fluent, key=lambda p: p["movement"])
    else:
        chosen = min(points, key=lambda p: p["degenerate_fraction"])
    return {
        "selected": chosen["setting"],
        "selected_key": chosen["setting_key"],
        "any_fluent": bool(fluent),
        "points": points,
        "rule": "the fluent DPO setting with the largest validation persona movement",
    }


def choose_default(runs: Sequence[Record], dpo_key: str) -> Record:
    """The frontier (every selection setting on validation) and the chosen BAPO default."""
    groups = by_setting(runs, ["dpo_tuning", "bapo_variants"])
    points = [point(group) for group in groups.values()]
    dpo = next((p for p in points if p["setting_key"] == dpo_key), None)
    candidates = [p for p in points if p["setting"]["method"] == "bapo" and p["fluent"]]
    if dpo is None or not candidates:
        return {"selected": None, "frontier": points, "reason": "no fluent BAPO setting yet"}
    dpo_loss = -dpo["knowledge_delta"]
    moving = [p for p in candidates if p["movement"] >= MOVEMENT_GOAL * dpo["movement"]]
    keeping = [p for p in candidates if -p["knowledge_delta"] <= LOSS_GOAL * max(dpo_loss, 0.0)]
    if moving:
        chosen, why = max(moving, key=lambda p: p["knowledge_delta"]), "moves ≥ 0.8× DPO"
    elif keeping:
        chosen, why = max(keeping, key=lambda p: p["movement"]), "loses ≤ ⅓ of DPO's knowledge"
    else:
        chosen, why = max(candidates, key=lambda p: p["movement"]), "largest fluent movement"
    return {
        "selected": chosen["setting"],
        "selected_key": chosen["setting_key"],
        "why": why,
        "dpo_key": dpo_key,
        "frontier": points,
    }


def goal(final_runs: Sequence[Record], dpo_key: str, bapo_key: str) -> Record:
    """movement_ratio, knowledge_loss_ratio, fluency_ok, users, seeds, met — test slices only."""
    dpo_runs = [r for r in final_runs if r["setting_key"] == dpo_key]
    bapo_runs = [r for r in final_runs if r["setting_key"] == bapo_key]
    common = {(r["user"], r["seed"]) for r in dpo_runs} & {
        (r["user"], r["seed"]) for r in bapo_runs
    }
    if not common:
        return {**EMPTY_GOAL, "reason": "no final runs yet"}
    dpo_runs = [r for r in dpo_runs if (r["user"], r["seed"]) in common]
    bapo_runs = [r for r in bapo_runs if (r["user"], r["seed"]) in common]
    dpo, bapo = point(dpo_runs), point(bapo_runs)
    dpo_loss, bapo_loss = -dpo["knowledge_delta"], -bapo["knowledge_delta"]
    dpo_se = max(dpo["knowledge_delta_stderr"], dpo["knowledge_delta_stderr_questions"])
    dpo_forgets = dpo_loss > 2 * dpo_se
    movement_ratio = bapo["movement"] / dpo["movement"] if dpo["movement"] > 0 else None
    loss_ratio = bapo_loss / dpo_loss if dpo_loss > 0 else None
    users = len({u for u, _ in common})
    seeds = len({s for _, s in common})
    met = bool(
        dpo_forgets
        and movement_ratio is not None
        and movement_ratio >= MOVEMENT_GOAL
        and loss_ratio is not None
        and loss_ratio <= LOSS_GOAL
        and bapo["fluent"]
        and users >= MIN_USERS
        and seeds >= MIN_SEEDS
    )
    return {
        "dpo": dpo_key,
        "bapo": bapo_key,
        "movement_ratio": movement_ratio,
        "knowledge_loss_ratio": loss_ratio,
        "fluency_ok": bapo["fluent"],
        "dpo_fluency_ok": dpo["fluent"],
        "dpo_forgets": dpo_forgets,
        "dpo_knowledge_loss": dpo_loss,
        "dpo_knowledge_loss_stderr": dpo_se,
        "dpo_knowledge_loss_stderr_users": dpo["knowledge_delta_stderr"],
        "dpo_knowledge_loss_stderr_questions": dpo["knowledge_delta_stderr_questions"],
        "bapo_knowledge_loss": bapo_loss,
        "dpo_movement": dpo["movement"],
        "bapo_movement": bapo["movement"],
        "difference": paired_difference(dpo_runs, bapo_runs),
        "unfluent_users": {"dpo": unfluent_users(dpo_runs), "bapo": unfluent_users(bapo_runs)},
        "users": users,
        "seeds": seeds,
        "targets": {
            "movement_ratio": f">= {MOVEMENT_GOAL}",
            "knowledge_loss_ratio": "<= 1/3",
            "users": MIN_USERS,
            "seeds": MIN_SEEDS,
        },
        "met": met,
    }


def unfluent_users(runs: Sequence[Record]) -> dict[str, Record]:
    """The users whose answers alone fail the fluency rule (the goal's rule is pooled), with their
    degenerate shares: the pooled verdict can hide one user's broken adapter."""
    found: dict[str, Record] = {}
    for user in sorted({r["user"] for r in runs}):
        p = point([r for r in runs if r["user"] == user])
        if not p["fluent"]:
            found[user] = {
                "degenerate_fraction": p["degenerate_fraction"],
                "base_degenerate_fraction": p["base_degenerate_fraction"],
            }
    return found


def paired_difference(dpo_runs: Sequence[Record], bapo_runs: Sequence[Record]) -> Record:
    """BAPO − DPO per (user, seed), averaged per user; stderr clustered by user."""
    dpo = {(r["user"], r["seed"]): r for r in dpo_runs}
    per_user: dict[str, dict[str, list[float]]] = {}
    for run in bapo_runs:
        other = dpo[(run["user"], run["seed"])]
        cell = per_user.setdefault(run["user"], {"knowledge": [], "movement": []})
        cell["knowledge"].append(
            run["knowledge"]["pooled"]["delta"] - other["knowledge"]["pooled"]["delta"]
        )
        cell["movement"].append(run["persona"]["movement"] - other["persona"]["movement"])
    result: Record = {}
    for name in ("knowledge", "movement"):
        values = [mean(cell[name]) for cell in per_user.values()]
        result[f"{name}_delta"] = mean(values)
        result[f"{name}_delta_stderr"] = stderr(values)
    result["per_user"] = {u: {k: mean(v) for k, v in c.items()} for u, c in per_user.items()}
    return result


def setting_of(data: Record | None) -> Setting | None:
    """A Setting from its recorded dict."""
    return None if data is None else Setting.from_dict(data)
