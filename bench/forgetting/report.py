"""Aggregates over runs (per method), λ selection on validation, the goal check, table and plot."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.forgetting.measures import mean, stderr

GOAL_LOSS_RATIO = 1 / 3  # BAPO's knowledge loss at most a third of DPO's ...
GOAL_PREFERENCE_RATIO = 0.95  # ... at held-out preference accuracy at least 95% of DPO's
Record = dict[str, Any]


def _hits(text: str) -> list[float]:
    """Per-question outcomes stored as a string of 0/1."""
    return [float(c) for c in text]


def pooled_knowledge_change(runs: Sequence[Record], base_hits: dict[str, str]) -> dict[str, float]:
    """Accuracy change vs base averaged over runs, per question; stderr over questions (paired)."""
    per_question: list[float] = []
    for name, base_text in base_hits.items():
        base = _hits(base_text)
        columns = [_hits(run["knowledge"][name]["hits"]) for run in runs]
        for i, b in enumerate(base):
            per_question.append(mean([col[i] - b for col in columns]))
    return {"delta": mean(per_question), "delta_stderr": stderr(per_question)}


def _combined_stderr(errors: Sequence[float]) -> float:
    """Stderr of a mean of independent estimates."""
    return math.sqrt(sum(e * e for e in errors)) / len(errors) if errors else 0.0


def method_summary(runs: Sequence[Record], base_hits: dict[str, str]) -> Record:
    """Means over the users a method was run on."""
    test = [run["preference"]["test"] for run in runs]
    rules = [run["rule"] for run in runs if "rule" in run]
    knowledge = pooled_knowledge_change(runs, base_hits)
    return {
        "label": runs[0]["label"],
        "anchor_weight": runs[0]["anchor_weight"],
        "users": [run["user"] for run in runs],
        "knowledge_delta": knowledge["delta"],
        "knowledge_delta_stderr": knowledge["delta_stderr"],
        "knowledge_delta_per_user": {r["user"]: r["knowledge"]["pooled"]["delta"] for r in runs},
        "test_preference_accuracy": mean([t["preference_accuracy"] for t in test]),
        "test_preference_accuracy_stderr": _combined_stderr(
            [t["preference_accuracy_stderr"] for t in test]
        ),
        "test_likelihood_accuracy": mean([t["likelihood_accuracy"] for t in test]),
        "validation_preference_accuracy": mean(
            [run["preference"]["validation"]["preference_accuracy"] for run in runs]
        ),
        "test_anchor_logratio": mean([t["anchor_logratio"] for t in test]),
        "test_anchor_below_frac": mean([t["anchor_below_frac"] for t in test]),
        "alignment_delta": mean([run["alignment"]["pooled"]["delta"] for run in runs]),
        "alignment_delta_stderr": _combined_stderr(
            [run["alignment"]["pooled"]["delta_stderr"] for run in runs]
        )
        * math.sqrt(len(runs)),  # same pairs for every user: errors are not independent
        "rule_win_rate": mean([r["win_rate"] for r in rules]) if rules else None,
        "rule_users": [run["user"] for run in runs if "rule" in run],
        "train_wall_s": sum(run["train_wall_s"] for run in runs),
        "eval_wall_s": sum(run["eval_wall_s"] for run in runs),
    }


def summarize(runs: Sequence[Record], base_hits: dict[str, str]) -> dict[str, Record]:
    """method key → method_summary, DPO first, then BAPO by λ."""
    keys = sorted({r["method_key"] for r in runs}, key=_method_order)
    return {k: method_summary([r for r in runs if r["method_key"] == k], base_hits) for k in keys}


def _method_order(key: str) -> tuple[int, float]:
    """DPO first, then BAPO by increasing λ."""
    return (0, 0.0) if key == "dpo" else (1, float(key.split("@")[1]))


def select_lambda(runs: Sequence[Record], lambdas: Sequence[float]) -> Record:
    """Largest λ whose mean VALIDATION preference accuracy is ≥ 95% of DPO's on the same users.

    Only users that ran DPO and every λ count. A larger λ anchors harder (less drift, less
    forgetting), so among λ that keep the preference goal on validation the largest is chosen;
    test slices and test MC subsets are never looked at.
    """
    by_user: dict[str, dict[str, Record]] = {}
    for run in runs:
        by_user.setdefault(run["user"], {})[run["method_key"]] = run
    keys = ["dpo"] + [f"bapo@{lam:g}" for lam in lambdas]
    users = sorted(u for u, done in by_user.items() if all(k in done for k in keys))
    if not users:
        return {"selected": None, "reason": "no user ran DPO and the whole sweep"}

    def validation(key: str, field: str) -> float:
        return mean([by_user[u][key]["preference"]["validation"][field] for u in users])

    dpo = validation("dpo", "preference_accuracy")
    curve = {
        f"{lam:g}": {
            "validation_preference_accuracy": validation(f"bapo@{lam:g}", "preference_accuracy"),
            "validation_anchor_logratio": validation(f"bapo@{lam:g}", "anchor_logratio"),
        }
        for lam in sorted(lambdas)
    }
    eligible = [
        lam
        for lam in sorted(lambdas)
        if curve[f"{lam:g}"]["validation_preference_accuracy"] >= GOAL_PREFERENCE_RATIO * dpo
    ]
    selected = max(eligible) if eligible else min(lambdas)
    return {
        "selected": selected,
        "users": users,
        "dpo_validation_preference_accuracy": dpo,
        "dpo_validation_anchor_logratio": validation("dpo", "anchor_logratio"),
        "curve": curve,
        "eligible": eligible,
        "rule": "largest λ with mean validation preference accuracy >= 0.95 × DPO's "
        "(none eligible: the smallest λ)",
    }


def goal_check(runs: Sequence[Record], bapo_key: str, base_hits: dict[str, str]) -> Record:
    """BAPO vs DPO on the users both ran: loss ratio, preference ratio, and whether DPO forgot."""
    users = {r["user"] for r in runs if r["method_key"] == bapo_key} & {
        r["user"] for r in runs if r["method_key"] == "dpo"
    }
    if not users:
        return {"bapo": bapo_key, "users": [], "met": False, "reason": "no common users"}
    dpo = method_summary(
        [r for r in runs if r["method_key"] == "dpo" and r["user"] in users], base_hits
    )
    bapo = method_summary(
        [r for r in runs if r["method_key"] == bapo_key and r["user"] in users], base_hits
    )
    dpo_loss, bapo_loss = -dpo["knowledge_delta"], -bapo["knowledge_delta"]
    dpo_forgets = dpo_loss > 2 * dpo["knowledge_delta_stderr"]
    loss_ratio = bapo_loss / dpo_loss if dpo_loss > 0 else None
    pref_ratio = (
        bapo["test_preference_accuracy"] / dpo["test_preference_accuracy"]
        if dpo["test_preference_accuracy"] > 0
        else None
    )
    loss_ok = loss_ratio is not None and loss_ratio <= GOAL_LOSS_RATIO
    pref_ok = pref_ratio is not None and pref_ratio >= GOAL_PREFERENCE_RATIO
    return {
        "bapo": bapo_key,
        "users": sorted(users),
        "dpo_knowledge_loss": dpo_loss,
        "dpo_knowledge_loss_stderr": dpo["knowledge_delta_stderr"],
        "dpo_forgets_beyond_2se": dpo_forgets,
        "bapo_knowledge_loss": bapo_loss,
        "bapo_knowledge_loss_stderr": bapo["knowledge_delta_stderr"],
        "loss_ratio": loss_ratio,
        "loss_ratio_ok": loss_ok,
        "dpo_test_preference_accuracy": dpo["test_preference_accuracy"],
        "bapo_test_preference_accuracy": bapo["test_preference_accuracy"],
        "preference_ratio": pref_ratio,
        "preference_ratio_ok": pref_ok,
        "met": bool(dpo_forgets and loss_ok and pref_ok),
    }


# --- Markdown ---------------------------------------------------------------------------------


def _pp(value: float | None, err: float | None = None) -> str:
    """A fraction as signed percentage points, with ± stderr."""
    if value is None:
        return "–"
    text = f"{100 * value:+.1f}"
    return f"{text} ± {100 * err:.1f}" if err is not None else text


def _pct(value: float | None) -> str:
    """A fraction as a percentage."""
    return "–" if value is None else f"{100 * value:.0f}%"


def markdown(result: Record) -> str:
    """The results as Markdown: method table, per-user table, MC screening, goal."""
    lines = [_header(result), "", *method_table(result), "", *user_table(result), ""]
    sweep = sweep_table(result)
    lines += [*sweep, ""] if sweep else []
    lines += [*screening_table(result), "", *goal_lines(result)]
    return "\n".join(lines) + "\n"


def _header(result: Record) -> str:
    """One line on what was run."""
    plan, machine = result["plan"], result["machine"]
    partial = "" if result["status"] == "done" else f"PARTIAL ({len(result['runs'])} runs so far). "
    return partial + (
        f"Mode `{result['mode']}`, seed {result['seed']}: {len(result['users'])} users, "
        f"{plan['steps']} steps × batch {result['train_config']['batch_size']}, "
        f"LoRA r{result['train_config']['lora_rank']}, lr {plan['learning_rate']:g}, "
        f"β {result['train_config']['beta']:g}; {machine['cpu_model']} × {machine['cores']} cores, "
        f"torch {machine['torch']}; {result['duration_s'] / 60:.0f} min."
    )


def method_table(result: Record) -> list[str]:
    """One row per method (means over the users it ran on)."""
    rows = [
        "| method | users | held-out pref. acc. | rule win rate | knowledge Δ (pp ± se) "
        "| HH alignment Δ (pp ± se) | base-anchor log-ratio (nats) |",
        "|---|---|---|---|---|---|---|",
        f"| base | – | 50% (tie) | 50% | 0 (pooled base acc "
        f"{_pct(result['base']['knowledge_pooled_accuracy'])}) | 0 (base "
        f"{_pct(result['base']['alignment_pooled_accuracy'])}) | 0 |",
    ]
    for s in result["summary"].values():
        rows.append(
            f"| {s['label']} | {len(s['users'])} | {_pct(s['test_preference_accuracy'])} "
            f"| {_pct(s['rule_win_rate'])} "
            f"| {_pp(s['knowledge_delta'], s['knowledge_delta_stderr'])} "
            f"| {_pp(s['alignment_delta'], s['alignment_delta_stderr'])} "
            f"| {s['test_anchor_logratio']:+.1f} |"
        )
    return rows


def user_table(result: Record) -> list[str]:
    """Per user and method: held-out preference accuracy / knowledge Δ."""
    keys = list(result["summary"])
    rows = [
        "| user | " + " | ".join(result["summary"][k]["label"] for k in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    by_cell = {(r["user"], r["method_key"]): r for r in result["runs"]}
    for user in [u["name"] for u in result["users"]]:
        cells = []
        for key in keys:
            run = by_cell.get((user, key))
            cells.append(
                "–"
                if run is None
                else f"{_pct(run['preference']['test']['preference_accuracy'])}"
                f" / {_pp(run['knowledge']['pooled']['delta'])}"
            )
        rows.append(f"| {user} | " + " | ".join(cells) + " |")
    return ["Per user: held-out preference accuracy / knowledge Δ (pp).", "", *rows]


def sweep_table(result: Record) -> list[str]:
    """The λ curve on the sweep users: validation (what selects λ) next to test."""
    selection = result.get("selection", {})
    if not selection.get("curve"):
        return []
    users, summary = sweep_summary(result)
    rows = [
        f"λ sweep on {', '.join(users)}: validation picks λ, test is reported.",
        "",
        "| method | validation pref. acc. | validation anchor (nats) | test pref. acc. "
        "| knowledge Δ (pp ± se) | test anchor (nats) |",
        "|---|---|---|---|---|---|",
    ]
    validation = {f"bapo@{lam}": point for lam, point in selection["curve"].items()}
    validation["dpo"] = {
        "validation_preference_accuracy": selection["dpo_validation_preference_accuracy"],
        "validation_anchor_logratio": selection["dpo_validation_anchor_logratio"],
    }
    for key, s in summary.items():
        if key not in validation:  # a λ run outside the sweep
            continue
        pref = validation[key]["validation_preference_accuracy"]
        anchor = validation[key]["validation_anchor_logratio"]
        chosen = " (selected)" if key == f"bapo@{selection['selected']:g}" else ""
        rows.append(
            f"| {s['label']}{chosen} | {_pct(pref)} | {anchor:+.1f} "
            f"| {_pct(s['test_preference_accuracy'])} "
            f"| {_pp(s['knowledge_delta'], s['knowledge_delta_stderr'])} "
            f"| {s['test_anchor_logratio']:+.1f} |"
        )
    return rows


def screening_table(result: Record) -> list[str]:
    """Each MC set's base accuracy next to chance, and whether it was kept."""
    rows = [
        "| MC set | n | base acc. ± se | chance | kept (z = (acc − chance) / se) |",
        "|---|---|---|---|---|",
    ]
    bar = result["plan"]["min_z_above_chance"]
    for name, s in result["base"]["knowledge_screening"].items():
        z = (s["accuracy"] - s["chance"]) / s["stderr"] if s["stderr"] else 0.0
        kept = f"yes (z {z:.2f})" if s["kept"] else f"no (z {z:.2f} < {bar:g})"
        rows.append(
            f"| {name} | {s['n']} | {100 * s['accuracy']:.1f} ± {100 * s['stderr']:.1f}% "
            f"| {100 * s['chance']:.0f}% | {kept} |"
        )
    return rows


def goal_lines(result: Record) -> list[str]:
    """The goal check, one sentence per compared BAPO setting."""
    lines = []
    seen: list[tuple[str, list[str]]] = []
    for check in result["goal"].values():
        if not check.get("users") or (check["bapo"], check["users"]) in seen:
            continue
        seen.append((check["bapo"], check["users"]))
        ratio = check["loss_ratio"] if check["dpo_forgets_beyond_2se"] else None
        lines.append(
            f"- {check['bapo']} vs DPO on {len(check['users'])} users: knowledge Δ "
            f"{_pp(-check['bapo_knowledge_loss'])} vs {_pp(-check['dpo_knowledge_loss'])} pp "
            "(loss "
            f"ratio {'n/a' if ratio is None else f'{ratio:.2f}'}, goal ≤ 0.33); held-out "
            f"preference {_pct(check['bapo_test_preference_accuracy'])} vs "
            f"{_pct(check['dpo_test_preference_accuracy'])} (ratio "
            f"{check['preference_ratio'] or 0:.2f}, goal ≥ 0.95); DPO forgets beyond 2 se: "
            f"{'yes' if check['dpo_forgets_beyond_2se'] else 'no'}; goal met: "
            f"{'yes' if check['met'] else 'no'}."
        )
    return lines


# --- plot -------------------------------------------------------------------------------------


def plot(result: Record, path: Path) -> None:
    """Knowledge change vs held-out preference accuracy, one point per (user, method); λ curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (scatter, curve) = plt.subplots(1, 2, figsize=(13, 5.5))
    keys = list(result["summary"])
    colors = _colors(keys)
    markers = {"dsp": "o", "dimension": "^"}
    kinds = {u["name"]: u["kind"] for u in result["users"]}
    for run in result["runs"]:
        scatter.scatter(
            100 * run["preference"]["test"]["preference_accuracy"],
            100 * run["knowledge"]["pooled"]["delta"],
            color=colors[run["method_key"]],
            marker=markers[kinds[run["user"]]],
            alpha=0.6,
            s=30,
        )
    for key, s in result["summary"].items():
        scatter.errorbar(
            100 * s["test_preference_accuracy"],
            100 * s["knowledge_delta"],
            xerr=100 * s["test_preference_accuracy_stderr"],
            yerr=100 * s["knowledge_delta_stderr"],
            color=colors[key],
            marker="D",
            markersize=9,
            markeredgecolor="black",
            capsize=3,
            label=f"{s['label']} (mean of {len(s['users'])})",
        )
    scatter.plot([50], [0], marker="*", color="black", markersize=12, ls="", label="base")
    scatter.axhline(0, color="grey", lw=0.8)
    scatter.axvline(50, color="grey", lw=0.8, ls=":")
    scatter.set_xlabel("held-out preference accuracy (%)  [personalization →]")
    scatter.set_ylabel("knowledge accuracy change vs base (pp)  [retention ↑]")
    scatter.set_title("one point per user × method (o DSP, ^ dimension); ◆ means ± se")
    scatter.legend(fontsize=8)
    _lambda_curve(curve, result)
    fig.suptitle(f"BAPO vs DPO forgetting — {result['mode']} mode, seed {result['seed']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _colors(keys: Sequence[str]) -> dict[str, Any]:
    """DPO red; BAPO λ along a blue-green colormap by λ."""
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    bapo = [k for k in keys if k != "dpo"]
    colors: dict[str, Any] = {"dpo": "tab:red"}
    for i, key in enumerate(bapo):
        colors[key] = cmap(0.15 + 0.75 * i / max(1, len(bapo) - 1))
    return colors


def sweep_summary(result: Record) -> tuple[list[str], dict[str, Record]]:
    """The method summaries on the sweep users only (those that ran DPO and every λ), so each
    point of the λ curve and the DPO line average the same users; all users without a sweep."""
    runs = result["runs"]
    users = result.get("selection", {}).get("users") or sorted({r["user"] for r in runs})
    return users, summarize(
        [r for r in runs if r["user"] in users], result["base"]["knowledge_hits"]
    )


def _lambda_curve(axis: Any, result: Record) -> None:
    """Mean test preference accuracy (left axis) and knowledge change (right axis) against λ."""
    users, summary = sweep_summary(result)
    points = sorted((s["anchor_weight"], s) for k, s in summary.items() if k != "dpo")
    axis.set_title(f"λ sweep on {', '.join(users)} (DPO dashed)")
    if not points:
        axis.text(0.5, 0.5, "no BAPO runs", ha="center", transform=axis.transAxes)
        return
    lams = [lam for lam, _ in points]
    knowledge = axis.twinx()
    for ax, field, fmt, color, label in (
        (axis, "test_preference_accuracy", "o-", "tab:blue", "held-out pref. acc."),
        (knowledge, "knowledge_delta", "s-", "tab:green", "knowledge Δ"),
    ):
        ax.errorbar(
            lams,
            [100 * s[field] for _, s in points],
            yerr=[100 * s[f"{field}_stderr"] for _, s in points],
            fmt=fmt,
            color=color,
            capsize=3,
            label=label,
        )
    if "dpo" in summary:
        axis.axhline(100 * summary["dpo"]["test_preference_accuracy"], color="tab:blue", ls="--")
        knowledge.axhline(100 * summary["dpo"]["knowledge_delta"], color="tab:green", ls="--")
    knowledge.axhline(0, color="grey", lw=0.8)
    axis.set_xscale("log")
    axis.set_xlabel("BAPO anchor weight λ (log scale)")
    axis.set_ylabel("held-out preference accuracy (%)", color="tab:blue")
    knowledge.set_ylabel("knowledge accuracy change vs base (pp)", color="tab:green")
    selected = result.get("selection", {}).get("selected")
    if selected is not None:
        axis.axvline(selected, color="black", ls=":", label=f"selected λ = {selected:g}")
    handles = axis.get_legend_handles_labels()[0] + knowledge.get_legend_handles_labels()[0]
    axis.legend(handles=handles, fontsize=8, loc="lower left")
