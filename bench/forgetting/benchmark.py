"""The whole benchmark: base measurements, the three phases in order, outputs, and resuming.

Every finished run is written into the result JSON at once; a restart with the same plan and data
seed reads it back and skips those runs, so a stopped run (a session ending, a crash) loses at
most the run in progress. Selection reads only validation runs; the final phase runs after it.

With `workers` > 1 the process forks that many workers after the base measurements (each
inherits them, nothing is measured twice). They share the result JSON: a worker claims a run
(a file in work_dir/claims holding its pid; a dead worker's claim is taken over), trains it, and
merges its record into the file under a lock. A phase ends when all its runs are recorded, so the
next phase's selection reads every worker's runs.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import platform
import shutil
import time
import traceback
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
    """One invocation (or one worker of it): the session, the recorded runs, and how to add one."""

    def __init__(self, session: Session, out_path: Path, header: Record, runs: list[Record]):
        self.session, self.out_path, self.header = session, out_path, header
        self.runs = runs
        self.started = time.perf_counter()
        self.keep_adapters = False
        self.claims = session.work_dir / "claims"  # run_benchmark: one dir for all workers
        self.poll_s = 10.0

    def done(self, spec: RunSpec) -> bool:
        """Whether this run is already recorded."""
        return any(r["key"] == spec.key for r in self.runs)

    def ensure(self, specs: list[RunSpec]) -> None:
        """Run every spec not yet recorded, recording each as it finishes; return once every one
        is recorded (by this worker or another)."""
        while True:
            self.sync()
            pending = [spec for spec in specs if not self.done(spec)]
            if not pending:
                return
            spec = next((s for s in pending if self.claim(s)), None)
            if spec is None:  # the rest are other workers' runs in progress
                time.sleep(self.poll_s)
                continue
            try:
                self.run(spec)
            finally:
                self.claim_path(spec).unlink(missing_ok=True)

    def run(self, spec: RunSpec) -> None:
        """Train and judge one run, then merge its record into the result file."""
        log = self.session.log
        log(f"run {len(self.runs) + 1}: {spec.key}")
        record = {**run_one(self.session, spec), "worker_pid": os.getpid()}
        _log_run(log, record)
        if not self.keep_adapters:
            shutil.rmtree(self.session.work_dir / "adapters", ignore_errors=True)
        with self.locked():
            self.sync()
            if not self.done(spec):
                self.runs.append(record)
            self.write("running", locked=True)

    def claim_path(self, spec: RunSpec) -> Path:
        """The claim file of one run."""
        return self.claims / (spec.key.replace("|", "--").replace(" ", "_").replace("/", "-"))

    def claim(self, spec: RunSpec) -> bool:
        """Claim a run for this process; False when a live worker holds it."""
        self.claims.mkdir(parents=True, exist_ok=True)
        path = self.claim_path(spec)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if _alive(path):
                    return False
                path.unlink(missing_ok=True)  # its worker died: take the run over
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(str(os.getpid()))
            return True
        return False

    def locked(self) -> Any:
        """An exclusive lock on the result file (its .lock sibling) for a read-merge-write."""
        return _FileLock(self.out_path.with_name(f".{self.out_path.name}.lock"))

    def sync(self) -> None:
        """Add the runs other workers recorded in the result file since we last read it."""
        if not self.out_path.is_file():
            return
        try:
            recorded = json.loads(self.out_path.read_text(encoding="utf-8")).get("runs", [])
        except (OSError, json.JSONDecodeError):
            return
        keys = {r["key"] for r in self.runs}
        self.runs += [r for r in recorded if r["key"] not in keys]

    def write(self, status: str, locked: bool = False) -> Record:
        """Assemble and write the result JSON atomically (merging other workers' runs first)."""
        if not locked:
            with self.locked():
                self.sync()
                return self.write(status, locked=True)
        result = assemble(self.session, self.runs, self.header, self.started, status)
        _write(self.out_path, result)
        return result


class _FileLock:
    """fcntl.flock on a file, as a context manager."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle: Any = None

    def __enter__(self) -> _FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = self.path.open("a")
        fcntl.flock(self.handle, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


def _alive(claim: Path) -> bool:
    """Whether the process named in a claim file still runs."""
    try:
        pid = int(claim.read_text() or "0")
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


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
    workers: int = 1,
) -> Record:
    """Run (or finish) every phase, writing out_path after each run and at the end; with
    workers > 1, that many forked processes share the runs (module doc)."""
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
    bench.claims = work_dir / "claims"
    if not resume:
        shutil.rmtree(bench.claims, ignore_errors=True)
    bench.write("running")  # the rejudged runs, and a file every worker merges into
    children = [] if workers <= 1 else _fork_workers(bench, workers - 1)
    if children is None:  # a forked worker: do runs until the phases are done, then leave
        code = 0
        try:
            _phases(bench, plan)
        except BaseException:
            session.log(f"worker failed (its run is left to the others):\n{traceback.format_exc()}")
            code = 1
        os._exit(code)  # never return into the parent's caller
    _phases(bench, plan)
    for pid in children:
        _, status = os.waitpid(pid, 0)
        if status:
            log(f"worker {pid} exited with status {status}")
    result = bench.write("done")
    write_report(out_path, result, make_plot=make_plot)
    log(f"done in {result['duration_s'] / 60:.1f} min → {out_path}")
    return result


def _fork_workers(bench: Benchmark, count: int) -> list[int] | None:
    """Fork `count` workers; the parent gets their pids, a child gets None (its own work dir
    and log prefix, the base measurements inherited)."""
    session = bench.session
    pids = []
    for k in range(1, count + 1):
        pid = os.fork()
        if pid == 0:
            import torch

            # OpenMP's thread team does not survive fork (a parallel op in the child waits on
            # threads that only exist in the parent): a worker computes on one thread, inline
            torch.set_num_threads(1)
            session.work_dir = session.work_dir / f"worker-{k}"
            session.log = _prefixed(session.log, f"[worker {k}] ")
            return None
        pids.append(pid)
    return pids


def _prefixed(log: Log, prefix: str) -> Log:
    """A log that puts a prefix before each message."""
    return lambda message: log(prefix + message)


def _phases(bench: Benchmark, plan: Plan) -> None:
    """DPO tuning, BAPO variants at the tuned budget, then the final comparison."""
    session = bench.session
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


def specs(
    phase: str, users: list[str], settings: list[Setting], seeds: tuple[int, ...]
) -> list[RunSpec]:
    """Every (user, setting, seed) of a phase, users outermost so each user finishes early."""
    return [RunSpec(phase, u, s, seed) for u in users for s in settings for seed in seeds]


def write_report(
    out_path: Path,
    result: Record | None = None,
    make_plot: bool = True,
    readme: Path | None = None,
) -> None:
    """The Markdown tables and the PNG next to the result JSON (read from it when not given),
    and README's forgetting block when `readme` is given. A result read from the JSON gets its
    selection and goal re-derived by the current rules, and the JSON is rewritten when they
    changed, so the recorded goal object always says what the report says."""
    if result is None:
        recorded: Record = json.loads(out_path.read_text(encoding="utf-8"))
        result = rederived(recorded)
        if (recorded["selection"], recorded["goal"]) != (result["selection"], result["goal"]):
            _write(out_path, result)
    out_path.with_suffix(".md").write_text(report.markdown(result), encoding="utf-8")
    if make_plot:
        report.plot(result, out_path.with_suffix(".png"))
    if readme is not None:
        plot_path = os.path.relpath(out_path.with_suffix(".png"), readme.parent)
        text = readme.read_text(encoding="utf-8")
        section = report.readme_section(result, plot_path)
        readme.write_text(report.replace_block(text, section), encoding="utf-8")


def load_result(out_path: Path) -> Record:
    """A recorded result with its selection and goal re-derived by the current rules."""
    return rederived(json.loads(out_path.read_text(encoding="utf-8")))


def rederived(recorded: Record) -> Record:
    """`recorded` (not changed) with its selection and goal derived again from its runs."""
    selection, goal = decide(recorded["runs"])
    return {**recorded, "selection": selection, "goal": goal}


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
