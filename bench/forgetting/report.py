"""The result JSON as Markdown tables and a PNG: goal, final test table, per-user figures, the
paired difference, DPO tuning and the validation frontier, example answers, MC screening."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.forgetting import select

Record = dict[str, Any]
EXAMPLES_PER_USER = 2
EXAMPLE_CHARS = 220
README_EXAMPLE_CHARS = 48  # README stays under 20 KB with 2 examples × 3 answers × 10 users
README_BEGIN = "<!-- forgetting:begin (written by python -m bench.forgetting --report-only) -->"
README_END = "<!-- forgetting:end -->"


def _pp(value: float | None, err: float | None = None) -> str:
    """A fraction as signed percentage points, with ± stderr."""
    if value is None:
        return "–"
    text = f"{100 * value:+.1f}"
    return f"{text} ± {100 * err:.1f}" if err is not None else text


def _pct(value: float | None) -> str:
    """A fraction as a percentage."""
    return "–" if value is None else f"{100 * value:.0f}%"


def _num(value: float | None, fmt: str = "+.3f") -> str:
    """A number or a dash."""
    return "–" if value is None else format(value, fmt)


def markdown(result: Record) -> str:
    """Every table of the report, in reading order."""
    sections = [
        [_header(result)],
        goal_lines(result),
        final_table(result),
        user_table(result),
        dpo_table(result),
        frontier_table(result),
        examples(result),
        screening_table(result),
    ]
    return "\n\n".join("\n".join(s) for s in sections if s) + "\n"


def _header(result: Record) -> str:
    """One line on what was run."""
    plan, machine = result["plan"], result["machine"]
    status = "" if result["status"] == "done" else f"PARTIAL ({len(result['runs'])} runs so far). "
    return status + (
        f"Mode `{result['mode']}`: {len(result['users'])} users; selection on "
        f"{', '.join(plan['selection_users'])} (seeds {plan['selection_seeds']}), final seeds "
        f"{plan['final_seeds']}; {machine['cpu_model']} × {machine['cores']} cores, torch "
        f"{machine['torch']}; {len(result['runs'])} runs, {result['run_wall_s'] / 60:.0f} min of "
        "runs in all (resumed invocations add up)."
    )


def goal_lines(result: Record) -> list[str]:
    """The goal object in words."""
    g = result["goal"]
    if g.get("movement_ratio") is None and g.get("knowledge_loss_ratio") is None:
        return [f"Goal: not evaluated yet ({g.get('reason', 'no final runs')})."]
    diff = g.get("difference", {})
    return [
        f"**Goal** (default `{g['bapo']}` vs tuned `{g['dpo']}`, test slices, {g['users']} users "
        f"× {g['seeds']} seeds): movement ratio {_num(g['movement_ratio'], '.2f')} (goal ≥ 0.8), "
        f"knowledge-loss ratio {_num(g['knowledge_loss_ratio'], '.2f')} (goal ≤ 0.33), default "
        f"fluent: {'yes' if g['fluency_ok'] else 'no'}; DPO forgets beyond 2 se: "
        f"{'yes' if g['dpo_forgets'] else 'no'} ({_pp(-g['dpo_knowledge_loss'])} ± "
        f"{100 * g['dpo_knowledge_loss_stderr']:.1f} pp{_se_parts(g)}); "
        f"**met: {'yes' if g['met'] else 'no'}**.",
        f"BAPO − DPO, paired per user and seed, stderr clustered by user: knowledge "
        f"{_pp(diff.get('knowledge_delta'), diff.get('knowledge_delta_stderr'))} pp, persona "
        f"movement {_num(diff.get('movement_delta'))} ± "
        f"{_num(diff.get('movement_delta_stderr'), '.3f')} nats/token.",
        *([] if g["dpo_forgets"] else [dpo_forgetting_line(result)]),
        *unfluent_line(g),
    ]


def _se_parts(g: Record) -> str:
    """Which se the goal took: the larger of the one across users and the per-question one."""
    if "dpo_knowledge_loss_stderr_users" not in g:
        return ""
    return (
        f"; se the larger of {100 * g['dpo_knowledge_loss_stderr_users']:.1f} across users and "
        f"{100 * g['dpo_knowledge_loss_stderr_questions']:.1f} over the questions"
    )


def unfluent_line(g: Record) -> list[str]:
    """The users whose own answers fail the fluency rule (the goal's verdict is pooled)."""
    found = g.get("unfluent_users")
    if not found or not any(found.values()):
        return []
    parts = []
    for method, label in (("bapo", "the default"), ("dpo", "tuned DPO")):
        users = found.get(method, {})
        listed = ", ".join(
            f"{u} ({_pct(f['degenerate_fraction'])} degenerate, base "
            f"{_pct(f['base_degenerate_fraction'])})"
            for u, f in users.items()
        )
        parts.append(f"{label}: {listed or 'none'}")
    return [
        "Fluency is judged pooled over users; alone, these users' answers fail the rule — "
        + "; ".join(parts)
        + "."
    ]


def dpo_forgetting_line(result: Record) -> str:
    """Where on the DPO grid (validation) the knowledge loss is beyond 2 se (the se as the goal
    takes it: the larger of the clustered and the per-question one). Shown when the tuned DPO's
    loss is not: then the knowledge-loss ratio says nothing, and this says what it would take."""
    points = result["selection"]["dpo"].get("points", [])
    if not points:
        return "The tuned DPO's knowledge loss is within 2 se of zero; no DPO grid is recorded."

    def se(p: Record) -> float:
        return float(max(p["knowledge_delta_stderr"], p.get("knowledge_delta_stderr_questions", 0)))

    def describe(p: Record) -> str:
        return (
            f"lr {p['setting']['learning_rate']:g} × {p['setting']['steps']} steps, "
            f"{_pp(p['knowledge_delta'])} pp (se {100 * se(p):.1f})"
            f"{'' if p['fluent'] else ', not fluent'}"
        )

    forgetting = [p for p in points if -p["knowledge_delta"] > 2 * se(p)]
    lead = "The tuned DPO's knowledge loss is within 2 se of zero, so the ratio says nothing."
    if forgetting:
        where = "; ".join(describe(p) for p in forgetting)
        return f"{lead} DPO forgets beyond 2 se on the grid (validation) at: {where}."
    worst = max(points, key=lambda p: -p["knowledge_delta"])
    return (
        f"{lead} No DPO setting on the grid (validation) forgets beyond 2 se either; the largest "
        f"loss is at {describe(worst)}."
    )


def _point_row(p: Record, marker: str = "") -> str:
    """One table row of a setting's pooled figures."""
    return (
        f"| {p['label']}{marker} | {p['setting']['learning_rate']:g} | {p['setting']['steps']} "
        f"| {_num(p['movement'])} ± {p['movement_stderr']:.3f} | {_pct(p['win_rate'])} "
        f"| {_num(p['rule_toward_user'], '+.2f')} "
        f"| {_pct(p['degenerate_fraction'])} ({_pct(p['base_degenerate_fraction'])}) "
        f"| {p['mean_nll']:.2f} ({p['base_mean_nll']:.2f}) "
        f"| {_pp(p['knowledge_delta'], p['knowledge_delta_stderr'])} "
        f"| {p['anchor_logratio']:+.1f} | {'yes' if p['fluent'] else '**no**'} |"
    )


_POINT_HEADER = [
    "| setting | lr | steps | persona movement (nats/token ± se) | win rate | rule toward user "
    "| degenerate (base) | NLL/token (base) | knowledge Δ (pp ± se) | anchor h_b (nats) "
    "| fluent |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
]


def final_table(result: Record) -> list[str]:
    """Tuned DPO and the default on the test slices of every user."""
    final = result["selection"].get("final", {})
    if not final:
        return []
    rows = [p for p in final.values()]
    alignment = ", ".join(
        f"{p['label']} {_pp(p['alignment_delta'])}"
        for p in rows
        if p["alignment_delta"] is not None
    )
    return [
        "**Test** (every user, final seeds; se clustered by user):",
        "",
        *_POINT_HEADER,
        *(_point_row(p) for p in rows),
        "",
        f"HH-RLHF alignment Δ (pp): {alignment or '–'}.",
    ]


def user_table(result: Record) -> list[str]:
    """Per user: test persona movement / knowledge Δ of the tuned DPO and the default."""
    final = result["selection"].get("final", {})
    if not final:
        return []
    keys = list(final)
    rows = [
        "Per user (test, mean over seeds): persona movement (nats/token) / knowledge Δ (pp) / "
        "degenerate answers.",
        "",
        "| user | " + " | ".join(final[k]["label"] for k in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for user in [u["name"] for u in result["users"]]:
        cells = []
        for key in keys:
            runs = [
                r
                for r in result["runs"]
                if r["phase"] == "final" and r["user"] == user and r["setting_key"] == key
            ]
            if not runs:
                cells.append("–")
                continue
            p = select.point(runs)
            cells.append(
                f"{p['movement']:+.3f} / {_pp(p['knowledge_delta'])} / "
                f"{_pct(p['degenerate_fraction'])}"
            )
        rows.append(f"| {user} | " + " | ".join(cells) + " |")
    return rows


def dpo_table(result: Record) -> list[str]:
    """The DPO grid on validation and the tuned setting."""
    dpo = result["selection"]["dpo"]
    if not dpo.get("points"):
        return []
    chosen = dpo.get("selected_key")
    plan = result["plan"]
    planned = (
        len(plan["dpo_learning_rates"])
        * len(plan["dpo_steps"])
        * len(plan["selection_users"])
        * len(plan["selection_seeds"])
    )
    done = sum(r["phase"] == "dpo_tuning" for r in result["runs"])
    tag = " (tuned)" if done >= planned else " (best so far)"
    return [
        "**DPO tuning** (validation, selection users): the fluent setting with the largest "
        f"persona movement is the tuned DPO ({done} of {planned} runs recorded).",
        "",
        *_POINT_HEADER,
        *(_point_row(p, tag if p["setting_key"] == chosen else "") for p in dpo["points"]),
    ]


def frontier_table(result: Record) -> list[str]:
    """Every BAPO setting on validation, at the tuned DPO's budget, and the chosen default."""
    default = result["selection"].get("default")
    if not default or not default.get("frontier"):
        return []
    chosen = default.get("selected_key")
    points = [p for p in default["frontier"] if p["setting"]["method"] == "bapo"]
    if not points:
        return []
    dpo = [p for p in default["frontier"] if p["setting_key"] == default.get("dpo_key")]
    why = f" ({default['why']})" if default.get("why") else ""
    return [
        f"**Frontier** (validation, selection users): BAPO variants at the tuned DPO's budget. "
        f"Default: `{chosen}`{why}.",
        "",
        *_POINT_HEADER,
        *(_point_row(p, " (tuned)") for p in dpo),
        *(_point_row(p, " (default)" if p["setting_key"] == chosen else "") for p in points),
    ]


def examples(result: Record) -> list[str]:
    """Per user, the first test prompts: the base's answer, DPO's and BAPO's (seed 0)."""
    final = result["selection"].get("final", {})
    if not final:
        return []
    rows = ["**Example answers** (test prompts, greedy, seed 0; cut for the table):", ""]
    prompts = {u["name"]: u.get("test_prompts", []) for u in result["users"]}
    for user in [u["name"] for u in result["users"]]:
        by_key = {
            r["setting_key"]: r
            for r in result["runs"]
            if r["phase"] == "final"
            and r["user"] == user
            and r["seed"] == min(r2["seed"] for r2 in result["runs"])
        }
        runs = [by_key[k] for k in final if k in by_key]
        if not runs:
            continue
        rows.append(f"*{user}*")
        rows.append("")
        for i in range(min(EXAMPLES_PER_USER, len(runs[0]["answers"]))):
            prompt = prompts[user][i] if i < len(prompts[user]) else f"test prompt {i + 1}"
            rows.append(f"- prompt: {_cut(prompt)}")
            rows.append(f"  - base: {_cut(runs[0]['base_answers'][i])}")
            for run in runs:
                rows.append(f"  - {run['label']}: {_cut(run['answers'][i])}")
        rows.append("")
    return rows


def _cut(text: str, limit: int = EXAMPLE_CHARS) -> str:
    """One line, at most `limit` characters, Markdown-safe."""
    flat = " ".join(text.split()).replace("|", "/")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


# --- README section ---------------------------------------------------------------------------


def readme_section(result: Record, plot_path: str = "bench/results/forgetting.png") -> str:
    """README's forgetting block: the plot, the goal, the default against tuned DPO on the test
    slices and two example answers per user (or, mid-run, how far the run is)."""
    final = result["selection"].get("final", {})
    image = f"![BAPO vs tuned DPO: validation frontier and test]({plot_path})"
    lines = [README_BEGIN, "", image, ""]
    if result["status"] != "done" or not final:
        lines += [_progress(result), ""]
    lines += [*goal_lines(result), ""]
    if final:
        lines += [*final_table(result), "", *readme_examples(result), ""]
    lines += [
        "Every table (per user, DPO grid, frontier, screening): "
        "[bench/results/forgetting.md](bench/results/forgetting.md).",
        "",
        README_END,
    ]
    return "\n".join(lines)


def _progress(result: Record) -> str:
    """How many runs are recorded, by phase, and which selection is already made."""
    phases: dict[str, int] = {}
    for run in result["runs"]:
        phases[run["phase"]] = phases.get(run["phase"], 0) + 1
    counts = ", ".join(f"{n} {phase.replace('_', ' ')}" for phase, n in phases.items())
    dpo = result["selection"]["dpo"].get("selected_key") or "not yet"
    default = (result["selection"].get("default") or {}).get("selected_key") or "not yet"
    return (
        f"**Run in progress** ({result['status']}): {len(result['runs'])} runs recorded "
        f"({counts or 'none'}). Tuned DPO: `{dpo}`; BAPO default from the runs so far: "
        f"`{default}`."
    )


def readme_examples(result: Record) -> list[str]:
    """Per user, the first test prompts' answers (base, tuned DPO, default; seed 0), one row
    each, cut to README_EXAMPLE_CHARS."""
    final = result["selection"]["final"]
    rows = [
        "Example answers (test prompts, greedy, seed 0, cut):",
        "",
        "| user | prompt | base | " + " | ".join(p["label"] for p in final.values()) + " |",
        "|---|---|---|" + "---|" * len(final),
    ]
    prompts = {u["name"]: u.get("test_prompts", []) for u in result["users"]}
    seed = min((r["seed"] for r in result["runs"] if r["phase"] == "final"), default=0)
    for user in [u["name"] for u in result["users"]]:
        by_key = {
            r["setting_key"]: r
            for r in result["runs"]
            if r["phase"] == "final" and r["user"] == user and r["seed"] == seed
        }
        runs = [by_key[k] for k in final if k in by_key]
        if len(runs) != len(final):
            continue
        for i in range(min(EXAMPLES_PER_USER, len(runs[0]["answers"]))):
            prompt = prompts[user][i] if i < len(prompts[user]) else f"test prompt {i + 1}"
            cells = [prompt, runs[0]["base_answers"][i], *(r["answers"][i] for r in runs)]
            cut = [_cut(c, README_EXAMPLE_CHARS) for c in cells]
            rows.append(f"| {user} | " + " | ".join(cut) + " |")
    return rows


def replace_block(text: str, block: str) -> str:
    """`text` with its README_BEGIN … README_END block replaced by `block`."""
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"no {README_BEGIN!r} … {README_END!r} block to replace")
    return text[:start] + block + text[end + len(README_END) :]


def screening_table(result: Record) -> list[str]:
    """Each MC set's base accuracy next to chance, and whether it was kept."""
    rows = [
        "| MC set | n (final) | base acc. ± se | chance | kept (z = (acc − chance) / se) "
        "| selection subset |",
        "|---|---|---|---|---|---|",
    ]
    bar = result["plan"]["min_z_above_chance"]
    for name, s in result["base"]["knowledge_screening"].items():
        kept = f"yes (z {s['z_above_chance']:.2f})" if s["kept"] else f"no (z < {bar:g})"
        rows.append(
            f"| {name} | {s['n']} | {100 * s['accuracy']:.1f} ± {100 * s['stderr']:.1f}% "
            f"| {100 * s['chance']:.0f}% | {kept} | {s['selection_questions']} |"
        )
    return rows


# --- plot -------------------------------------------------------------------------------------


def plot(result: Record, path: Path) -> None:
    """Left: the validation frontier (movement vs knowledge Δ, hollow = not fluent); right: the
    final test comparison per user."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5))
    _frontier_axis(left, result)
    _final_axis(right, result)
    fig.suptitle(f"BAPO vs tuned DPO — {result['mode']} mode ({result['status']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


FORM_MARKERS = {"hinge": "o", "hinge_per_token": "s", "hinge_tolerance": "^", "replay": "D",
                "sigmoid": "v"}  # fmt: skip


def _frontier_axis(axis: Any, result: Record) -> None:
    """Every selection setting on validation: persona movement (x) vs knowledge Δ (y)."""
    default = result["selection"].get("default") or {}
    points: Sequence[Record] = default.get("frontier") or result["selection"]["dpo"].get(
        "points", []
    )
    for p in points:
        setting = p["setting"]
        is_dpo = setting["method"] == "dpo"
        color = "tab:red" if is_dpo else "tab:blue"
        marker = "x" if is_dpo else FORM_MARKERS.get(setting["anchor_form"], "o")
        style = {"color": color} if is_dpo else {
            "facecolors": color if p["fluent"] else "none", "edgecolors": color,
        }  # fmt: skip
        axis.scatter(p["movement"], 100 * p["knowledge_delta"], marker=marker, s=60, **style)
        budget = f" {setting['learning_rate']:g}/{setting['steps']}" if is_dpo else ""
        label = p["label"].replace("BAPO ", "") + budget
        axis.annotate(label, (p["movement"], 100 * p["knowledge_delta"]), fontsize=6, alpha=0.8)
    chosen = [p for p in points if p["setting_key"] == default.get("selected_key")]
    for p in chosen:
        axis.scatter(
            p["movement"], 100 * p["knowledge_delta"], marker="*", s=260,
            color="gold", edgecolors="black", zorder=5, label="chosen default",
        )  # fmt: skip
    axis.axhline(0, color="grey", lw=0.8)
    axis.axvline(0, color="grey", lw=0.8, ls=":")
    axis.set_xlabel("persona movement vs base answers (nats/token)  [personalization →]")
    axis.set_ylabel("knowledge change vs base (pp)  [retention ↑]")
    axis.set_title("validation frontier (x DPO grid; BAPO: o hinge □ per-token △ tolerance ◇ "
                   "replay; hollow = not fluent)", fontsize=8)  # fmt: skip
    if chosen:
        axis.legend(fontsize=8)


def _final_axis(axis: Any, result: Record) -> None:
    """Final test runs: one point per user (mean over seeds) and method, and the means."""
    final = result["selection"].get("final", {})
    if not final:
        axis.text(0.5, 0.5, "final phase not run yet", ha="center", transform=axis.transAxes)
        return
    colors = ["tab:red", "tab:blue", "tab:green"]
    for color, (key, summary) in zip(colors, final.items(), strict=False):
        for user in summary["users"]:
            runs = [
                r for r in result["runs"]
                if r["phase"] == "final" and r["setting_key"] == key and r["user"] == user
            ]  # fmt: skip
            p = select.point(runs)
            axis.scatter(p["movement"], 100 * p["knowledge_delta"], color=color, alpha=0.5, s=25)
        axis.errorbar(
            summary["movement"], 100 * summary["knowledge_delta"],
            xerr=summary["movement_stderr"], yerr=100 * summary["knowledge_delta_stderr"],
            color=color, marker="D", markersize=9, markeredgecolor="black", capsize=3,
            label=f"{summary['label']} (mean of {len(summary['users'])} users)",
        )  # fmt: skip
    axis.axhline(0, color="grey", lw=0.8)
    axis.axvline(0, color="grey", lw=0.8, ls=":")
    axis.set_xlabel("persona movement vs base answers (nats/token)")
    axis.set_ylabel("knowledge change vs base (pp)")
    axis.set_title("test: tuned DPO vs the chosen default, per user (se clustered by user)")
    axis.legend(fontsize=8)
