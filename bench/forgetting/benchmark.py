"""The whole benchmark: base measurements, the runs in order, selection, summary and outputs."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

from bench.forgetting import report
from bench.forgetting.plan import Plan
from bench.forgetting.runner import Log, Method, Session, measure_base, open_session, run_one

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


def run_order(session: Session) -> list[tuple[str, Method]]:
    """DPO and default BAPO for every user first, then the λ sweep on the sweep users."""
    plan = session.plan
    default = Method("bapo", plan.default_lambda)
    order = [(u.name, m) for u in session.users for m in (Method("dpo"), default)]
    sweep_users = plan.sweep_users or [u.name for u in session.users]
    for lam in plan.sweep_lambdas:
        order += [(name, Method("bapo", lam)) for name in sweep_users if _has(session, name)]
    return order


def _has(session: Session, user_name: str) -> bool:
    """Whether this run built the named user."""
    return any(u.name == user_name for u in session.users)


def run_benchmark(
    plan: Plan,
    *,
    seed: int,
    data_dir: Path,
    model_path: Path,
    work_dir: Path,
    out_path: Path,
    log: Log,
    keep_adapters: bool = False,
    make_plot: bool = True,
) -> Record:
    """Run everything, writing out_path after each run (status 'running') and at the end."""
    started, started_at = time.perf_counter(), _now()
    run_dir = work_dir / "runs" / started_at.replace(":", "")
    session = open_session(
        plan,
        seed,
        data_dir=data_dir,
        model_path=model_path,
        work_dir=run_dir,
        cache_dir=work_dir / "cache",
        log=log,
    )
    header = {"machine": machine_info(), "started_at": started_at, "seed": seed}
    measure_base(session)
    runs: list[Record] = []

    def do(user_name: str, method: Method) -> None:
        user = next(u for u in session.users if u.name == user_name)
        log(f"run {len(runs) + 1}: {user.name} / {method.label}")
        record = run_one(session, user, method)
        runs.append(record)
        _log_run(log, record)
        if not keep_adapters:
            shutil.rmtree(run_dir / "adapters", ignore_errors=True)
        _write(out_path, assemble(session, runs, header, started, "running"))

    for user_name, method in run_order(session):
        do(user_name, method)
    lambdas = sorted({plan.default_lambda, *plan.sweep_lambdas})
    selection = report.select_lambda(runs, lambdas)
    chosen = selection.get("selected")
    if chosen is not None and plan.selected_on_all_users:
        for user in session.users:  # the selected λ on the users outside the sweep
            if not any(
                r["user"] == user.name and r["method_key"] == f"bapo@{chosen:g}" for r in runs
            ):
                do(user.name, Method("bapo", chosen))
    result = assemble(session, runs, header, started, "done")
    _write(out_path, result)
    write_report(out_path, result, make_plot=make_plot)
    log(f"done in {result['duration_s'] / 60:.1f} min → {out_path}")
    return result


def write_report(out_path: Path, result: Record | None = None, make_plot: bool = True) -> None:
    """The Markdown table and the PNG next to the result JSON (read from it when not given)."""
    if result is None:
        result = json.loads(out_path.read_text(encoding="utf-8"))
    out_path.with_suffix(".md").write_text(report.markdown(result), encoding="utf-8")
    if make_plot:
        report.plot(result, out_path.with_suffix(".png"))


def assemble(
    session: Session, runs: list[Record], header: Record, started: float, status: str
) -> Record:
    """The result document (every number, the config, the machine, the duration)."""
    plan = session.plan
    base_hits = {n: "".join(str(int(h)) for h in o.hits) for n, o in session.base_knowledge.items()}
    pooled_base = [h for o in session.base_knowledge.values() for h in o.hits]
    pooled_hh = [h for hits in session.base_alignment.values() for h in hits]
    lambdas = sorted({plan.default_lambda, *plan.sweep_lambdas})
    selection = report.select_lambda(runs, lambdas) if runs else {"selected": None}
    goal: Record = {}
    if runs:
        goal["default"] = report.goal_check(runs, f"bapo@{plan.default_lambda:g}", base_hits)
        if selection.get("selected") is not None:
            goal["selected"] = report.goal_check(runs, f"bapo@{selection['selected']:g}", base_hits)
    machine = dict(header["machine"], load_average_now=list(os.getloadavg()))
    return {
        "benchmark": "forgetting",
        "status": status,
        "mode": plan.mode,
        "seed": header["seed"],
        "started_at": header["started_at"],
        "finished_at": _now(),
        "duration_s": time.perf_counter() - started,
        "machine": machine,
        "model": {"path": str(session.model_path), "identity": session.identity},
        "data_dir": str(session.data_dir),
        "plan": plan.to_dict(),
        "train_config": session.config.to_dict(),
        "methods_differ_only_in": ["method", "anchor_weight"],
        "timings_s": session.timings,
        "cache_entries_at_start": session.cache_at_start,
        "base": {
            "knowledge_screening": session.screening,
            "knowledge_kept": list(session.knowledge),
            "knowledge_hits": base_hits,
            "knowledge_pooled_accuracy": sum(pooled_base) / max(1, len(pooled_base)),
            "alignment": {
                split: {
                    "accuracy": sum(h) / max(1, len(h)),
                    "n": len(h),
                    "hits": "".join(str(int(x)) for x in h),
                }
                for split, h in session.base_alignment.items()
            },
            "alignment_pooled_accuracy": sum(pooled_hh) / max(1, len(pooled_hh)),
            "users": session.base_preference,
        },
        "users": [u.describe() for u in session.users],
        "runs": runs,
        "summary": report.summarize(runs, base_hits) if runs else {},
        "selection": selection,
        "goal": goal,
    }


def _log_run(log: Log, record: Record) -> None:
    """One line per finished run."""
    test = record["preference"]["test"]
    knowledge = record["knowledge"]["pooled"]
    log(
        f"  pref acc {test['preference_accuracy']:.2f}, anchor {test['anchor_logratio']:+.1f}, "
        f"knowledge Δ {100 * knowledge['delta']:+.1f} ± {100 * knowledge['delta_stderr']:.1f} pp"
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
