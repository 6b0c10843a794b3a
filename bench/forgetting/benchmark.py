"""The whole benchmark: base measurements, the three phases in order, outputs, and resuming.

Every finished run is written into the result JSON at once; a restart with the same plan and data
seed reads it back and skips those runs, so a stopped run (a session ending, a crash) loses at
most the run in progress. Selection reads only validation runs; the final phase runs after it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

from bench.forgetting import report, select
from bench.forgetting.plan import Plan, Setting
from bench.forgetting.runner import (
    Log,
    RunSpec,
    Session,
    measure_base,
    open_session,
    rejudge_fluency,
    run_one,
)

Record = dict[str, Any]


def machine_info() -> Record:
    """CPU model, cores, load and library versions (timings on a shared machine vary)."""
    import peft
    import torch
    import transformers

    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": list(os.getloadavg()),
    }


def previous_runs(out_path: Path, plan: Plan, data_seed: int, log: Log) -> list[Record]:
    """Runs recorded by an earlier invocation of the same plan and data seed (resume)."""
    if not out_path.is_file():
        return []
    try:
        earlier = json.loads(out_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return []
    same_plan = earlier.get("plan") == json.loads(json.dumps(plan.to_dict()))
    if not same_plan or earlier.get("data_seed") != data_seed:
        log(f"{out_path} holds another plan or seed: starting afresh")
        return []
    runs = list(earlier.get("runs", []))
    log(f"resuming: {len(runs)} recorded runs in {out_path} are kept and skipped")
    return runs


class Benchmark:
    """One invocation: the session, the recorded runs, and how to add one."""

    def __init__(self, session: Session, out_path: Path, header: Record, runs: list[Record]):
        self.session, self.out_path, self.header = session, out_path, header
        self.runs = runs
        self.started = time.perf_counter()
        self.keep_adapters = False

    def done(self, spec: RunSpec) -> bool:
        """Whether this run is already recorded."""
        return any(r["key"] == spec.key for r in self.runs)

    def ensure(self, specs: list[RunSpec]) -> None:
        """Run every spec not yet recorded, recording each as it finishes."""
        for spec in specs:
            if self.done(spec):
                continue
            log = self.session.log
            log(f"run {len(self.runs) + 1}: {spec.key}")
            record = run_one(self.session, spec)
            self.runs.append(record)
            _log_run(log, record)
            if not self.keep_adapters:
                shutil.rmtree(self.session.work_dir / "adapters", ignore_errors=True)
            self.write("running")

    def write(self, status: str) -> Record:
        """Assemble and write the result JSON atomically."""
        result = assemble(self.session, self.runs, self.header, self.started, status)
        _write(self.out_path, result)
        return result


def run_benchmark(
    plan: Plan,
    *,
    data_seed: int,
    data_dir: Path,
    model_path: Path,
    work_dir: Path,
    out_path: Path,
    log: Log,
    keep_adapters: bool = False,
    make_plot: bool = True,
    resume: bool = True,
) -> Record:
    """Run (or finish) every phase, writing out_path after each run and at the end."""
    started, started_at = time.perf_counter(), _now()
    runs = previous_runs(out_path, plan, data_seed, log) if resume else []
    session = open_session(
        plan,
        data_seed,
        data_dir=data_dir,
        model_path=model_path,
        work_dir=work_dir / "runs" / started_at.replace(":", ""),
        cache_dir=work_dir / "cache",
        log=log,
    )
    header = {"machine": machine_info(), "started_at": started_at, "data_seed": data_seed}
    measure_base(session)
    runs = [rejudge_fluency(session, record) for record in runs]  # a newer fluency rule
    bench = Benchmark(session, out_path, header, runs)
    bench.started, bench.keep_adapters = started, keep_adapters
    users = [u.name for u in session.users]
    selection_users = [u for u in plan.selection_users if u in users]
    bench.ensure(specs("dpo_tuning", selection_users, plan.dpo_grid(), plan.selection_seeds))
    tuned = select.setting_of(select.tune_dpo(bench.runs)["selected"])
    assert tuned is not None
    variants = [s.at_budget(tuned.learning_rate, tuned.steps) for s in plan.bapo_grid]
    bench.ensure(specs("bapo_variants", selection_users, variants, plan.selection_seeds))
    default = select.setting_of(select.choose_default(bench.runs, tuned.key)["selected"])
    final = [tuned] + ([default] if default is not None else [])
    bench.ensure(specs("final", users, final, plan.final_seeds))
    result = bench.write("done")
    write_report(out_path, result, make_plot=make_plot)
    log(f"done in {result['duration_s'] / 60:.1f} min → {out_path}")
    return result


def specs(
    phase: str, users: list[str], settings: list[Setting], seeds: tuple[int, ...]
) -> list[RunSpec]:
    """Every (user, setting, seed) of a phase, users outermost so each user finishes early."""
    return [RunSpec(phase, u, s, seed) for u in users for s in settings for seed in seeds]


def write_report(out_path: Path, result: Record | None = None, make_plot: bool = True) -> None:
    """The Markdown tables and the PNG next to the result JSON (read from it when not given)."""
    if result is None:  # re-derive the selection and goal with the current rules
        result = json.loads(out_path.read_text(encoding="utf-8"))
        result["selection"], result["goal"] = decide(result["runs"])
    out_path.with_suffix(".md").write_text(report.markdown(result), encoding="utf-8")
    if make_plot:
        report.plot(result, out_path.with_suffix(".png"))


def assemble(
    session: Session, runs: list[Record], header: Record, started: float, status: str
) -> Record:
    """The result document (every number, the plan, the machine, the duration)."""
    plan = session.plan
    selection, goal = decide(runs)
    machine = dict(header["machine"], load_average_now=list(os.getloadavg()))
    return {
        "benchmark": "forgetting",
        "status": status,
        "mode": plan.mode,
        "data_seed": header["data_seed"],
        "started_at": header["started_at"],
        "finished_at": _now(),
        "duration_s": time.perf_counter() - started,
        "run_wall_s": sum(r["train_wall_s"] + r["eval_wall_s"] for r in runs),
        "machine": machine,
        "model": {"path": str(session.model_path), "identity": session.identity},
        "data_dir": str(session.data_dir),
        "plan": plan.to_dict(),
        "timings_s": session.timings,
        "cache_entries_at_start": session.cache_at_start,
        "base": base_record(session),
        "users": [u.describe() for u in session.users],
        "runs": runs,
        "selection": selection,
        "goal": goal,
    }


def decide(runs: list[Record]) -> tuple[Record, Record]:
    """The selection (DPO tuning, frontier and default, final summaries) and the goal, from the
    recorded runs by the rules in bench.forgetting.select."""
    dpo = select.tune_dpo(runs)
    selection: Record = {"dpo": dpo}
    goal: Record = {**select.EMPTY_GOAL, "reason": "selection not finished"}
    if dpo.get("selected_key"):
        selection["default"] = select.choose_default(runs, dpo["selected_key"])
        bapo_key = selection["default"].get("selected_key")
        if bapo_key:
            finals = [r for r in runs if r["phase"] == "final"]
            goal = select.goal(finals, dpo["selected_key"], bapo_key)
            selection["final"] = {
                key: select.point([r for r in finals if r["setting_key"] == key])
                for key in (dpo["selected_key"], bapo_key)
                if any(r["setting_key"] == key for r in finals)
            }
    return selection, goal


def base_record(session: Session) -> Record:
    """The base model's measurements the report needs."""
    return {
        "knowledge_screening": session.screening,
        "knowledge_kept": list(session.knowledge.get("final", {})),
        "knowledge_questions": {
            scope: sum(len(q) for q in sets.values()) for scope, sets in session.knowledge.items()
        },
        "alignment": {
            split: {"accuracy": sum(h) / max(1, len(h)), "n": len(h)}
            for split, h in session.base_alignment.items()
        },
        "nll_bound": {s: band.to_json() for s, band in session.nll_bound.items()},
        "users": {
            user: {
                s: {
                    "persona": base.persona,
                    "mean_nll": sum(base.nll) / max(1, len(base.nll)),
                    "degenerate_fraction": sum(base.degenerate) / max(1, len(base.degenerate)),
                    "pairs": session.base_preference[user][s],
                }
                for s, base in slices.items()
            }
            for user, slices in session.base_slices.items()
        },
    }


def _log_run(log: Log, record: Record) -> None:
    """One line per finished run."""
    knowledge, persona = record["knowledge"]["pooled"], record["persona"]
    log(
        f"  persona movement {persona['movement']:+.3f} (win {persona['win_rate']:.2f}), "
        f"degenerate {record['fluency']['degenerate_fraction']:.2f}, "
        f"knowledge Δ {100 * knowledge['delta']:+.1f} ± {100 * knowledge['delta_stderr']:.1f} pp"
        f", anchor {record['preference']['anchor_logratio']:+.1f}"
        f" (train {record['train_wall_s']:.0f}s, eval {record['eval_wall_s']:.0f}s)"
    )


def _write(path: Path, result: Record) -> None:
    """Write the JSON atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    tmp.replace(path)


def _now() -> str:
    """UTC time, ISO 8601, seconds."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
