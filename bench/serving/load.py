"""A closed-loop load generator: N requests at a fixed concurrency, direct to vLLM or via our API.

Both paths send the same requests (same prompts, greedy, same max_tokens, same adapter names on
the vLLM side), so their output tokens are the same and their throughputs are comparable.
Throughput = completion tokens of all requests / (last response − first request sent).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.common import median
from foundation.stats import quantile

PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain step by step how to bake a loaf of bread at home.",
    "Describe a walk through a busy market on a summer morning.",
    "List ten ideas for a rainy weekend and say why each one is fun.",
    "Tell me about the history of the bicycle in a few paragraphs.",
    "Write a friendly letter to a new neighbour introducing yourself.",
    "Explain how a rainbow forms, as if to a curious child.",
    "Describe your ideal holiday in detail, from morning to night.",
)


@dataclass(frozen=True)
class Target:
    """Where one request goes: a user (API) and the vLLM model name it resolves to."""

    user_id: str
    selector: str  # our API's `adapter`: "base" or "v<N>"
    vllm_model: str  # the served base name, or the adapter's name `user-<id>-v<N>`


@dataclass(frozen=True)
class Sample:
    """One request's outcome."""

    started: float
    ended: float
    completion_tokens: int
    ok: bool
    error: str = ""

    @property
    def latency_s(self) -> float:
        return self.ended - self.started


@dataclass
class CellResult:
    """One (mix, path) cell: throughput and latency figures."""

    mix: str
    path: str
    round: int
    requests: int
    concurrency: int
    errors: int
    output_tokens: int
    elapsed_s: float
    latencies_s: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        """Figures (latencies summarised)."""
        return {
            "mix": self.mix, "path": self.path, "round": self.round,
            "requests": self.requests, "concurrency": self.concurrency, "errors": self.errors,
            "output_tokens": self.output_tokens, "elapsed_s": self.elapsed_s,
            "tokens_per_s": self.tokens_per_s,
            "mean_output_tokens": self.output_tokens / max(1, self.requests - self.errors),
            "p50_s": median(self.latencies_s), "p99_s": quantile(self.latencies_s, 0.99),
        }  # fmt: skip


Send = Callable[[httpx.AsyncClient, int, Target], Awaitable[int]]


def direct_sender(max_tokens: int) -> Send:
    """POST /v1/chat/completions on the vLLM server; returns completion tokens."""

    async def send(client: httpx.AsyncClient, index: int, target: Target) -> int:
        body = {
            "model": target.vllm_model,
            "messages": [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
        }
        response = await client.post("/v1/chat/completions", json=body)
        response.raise_for_status()
        return int(response.json()["usage"]["completion_tokens"])

    return send


def api_sender(max_tokens: int, keys: dict[str, str]) -> Send:
    """POST /users/{id}/generate on our API (with that user's key); returns completion tokens."""

    async def send(client: httpx.AsyncClient, index: int, target: Target) -> int:
        body = {
            "prompt": PROMPTS[index % len(PROMPTS)],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "adapter": target.selector,
        }
        headers = {"Authorization": f"Bearer {keys[target.user_id]}"}
        url = f"/users/{target.user_id}/generate"
        response = await client.post(url, json=body, headers=headers)
        response.raise_for_status()
        return int(response.json()["usage"]["completion_tokens"])

    return send


async def run_cell(
    base_url: str, send: Send, targets: list[Target], requests: int, concurrency: int
) -> tuple[list[Sample], float]:
    """Send `requests` requests (request i → targets[i % len]) with `concurrency` in flight."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    samples: list[Sample] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                index = queue.get_nowait()
                started = time.perf_counter()
                try:
                    tokens = await send(client, index, targets[index % len(targets)])
                    samples.append(Sample(started, time.perf_counter(), tokens, True))
                except httpx.HTTPError as exc:
                    samples.append(Sample(started, time.perf_counter(), 0, False, repr(exc)))

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples, time.perf_counter() - began


def cell_result(
    mix: str, path: str, round_index: int, concurrency: int, samples: list[Sample], elapsed: float
) -> CellResult:
    """Summarise a cell's samples."""
    ok = [s for s in samples if s.ok]
    return CellResult(
        mix=mix, path=path, round=round_index, requests=len(samples), concurrency=concurrency,
        errors=len(samples) - len(ok), output_tokens=sum(s.completion_tokens for s in ok),
        elapsed_s=elapsed, latencies_s=[s.latency_s for s in ok],
    )  # fmt: skip


async def first_token_s(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str]
) -> float:
    """Seconds from sending a streamed request until its first content token arrives."""
    started = time.perf_counter()
    async with client.stream("POST", url, json=body, headers=headers) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data:") :])
            choices = chunk.get("choices") or [{}]
            if (choices[0].get("delta") or {}).get("content"):
                return time.perf_counter() - started
    raise RuntimeError(f"no content token from {url}")
