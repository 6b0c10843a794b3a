"""Batching concurrent requests for the in-process backend.

Requests that arrive while the model is busy wait in a bounded queue; when the model is free, the
waiting requests that can share one `generate` (same sampling settings, no per-request extras) run
as one batch, each row with its own adapter (PEFT's mixed-adapter batch). An idle server adds no
delay: the first request runs at once, alone. Per-request extras that one batched `generate`
cannot give each row (a seed, n > 1, log-probs, penalties, logit bias, a JSON grammar) run alone.

Everything here runs on the event loop; the batch itself runs on the model thread, and reports
back through `BatchItem.emit` / `finish` / `fail`, which are safe to call from that thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from app.core.errors import ServiceUnavailable
from app.inference.base import AdapterRef, GenerationRequest, GenerationResult

BUSY_RETRY_AFTER = {"Retry-After": "2"}


def batch_key(request: GenerationRequest) -> tuple[object, ...] | None:
    """What requests must share to run in one batch; None when this one must run alone."""
    alone = (
        request.n > 1
        or request.seed is not None
        or request.logprobs is not None
        or request.presence_penalty
        or request.frequency_penalty
        or request.logit_bias
        or request.response_format is not None
    )
    if alone:
        return None
    return ("greedy",) if request.greedy else ("sample", request.temperature, request.top_p)


@dataclass
class BatchItem:
    """One request waiting for, or running in, a batch."""

    request: GenerationRequest
    adapter: AdapterRef | None
    loop: asyncio.AbstractEventLoop
    streaming: bool = False
    cancel: threading.Event = field(default_factory=threading.Event)
    pieces: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)
    result: asyncio.Future[GenerationResult] = field(init=False)

    def __post_init__(self) -> None:
        self.result = self.loop.create_future()

    # Called from the model thread:

    def emit(self, text: str) -> None:
        """A piece of the answer's text (streaming requests only)."""
        if self.streaming and text:
            self.loop.call_soon_threadsafe(self.pieces.put_nowait, text)

    def finish(self, result: GenerationResult) -> None:
        """The answer is complete."""
        self.loop.call_soon_threadsafe(self._settle, result, None)

    def fail(self, error: BaseException) -> None:
        """The batch failed."""
        self.loop.call_soon_threadsafe(self._settle, None, error)

    def _settle(self, result: GenerationResult | None, error: BaseException | None) -> None:
        if not self.result.done():
            if error is not None:
                self.result.set_exception(error)
            else:
                assert result is not None
                self.result.set_result(result)
        self.pieces.put_nowait(None)  # the stream's end marker


RunBatch = Callable[[list[BatchItem]], Awaitable[None]]


class Batcher:
    """The waiting requests, and the one task that feeds them to the model in batches."""

    def __init__(self, run: RunBatch, max_batch: int, max_queue: int, max_adapters: int) -> None:
        self._run = run
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_adapters = max_adapters
        self._waiting: list[BatchItem] = []
        self._draining: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> int:
        """Requests queued, not yet running."""
        return len(self._waiting)

    def submit(self, item: BatchItem) -> None:
        """Queue a request (503 when the queue is full) and make sure the queue is drained."""
        if len(self._waiting) >= self.max_queue:
            raise ServiceUnavailable(
                f"The in-process model has {len(self._waiting)} requests waiting; retry shortly",
                "inference_busy",
                headers=BUSY_RETRY_AFTER,
            )
        self._waiting.append(item)
        if self._draining is None or self._draining.done():
            self._draining = asyncio.get_running_loop().create_task(self._drain())

    def withdraw(self, item: BatchItem) -> None:
        """Forget a request that has not started (its client went away)."""
        if item in self._waiting:
            self._waiting.remove(item)

    async def _drain(self) -> None:
        """Run batches until nothing waits."""
        while self._waiting:
            batch = self._next_batch()
            try:
                await self._run(batch)
            except BaseException as exc:  # each waiter learns it; the drain goes on
                for item in batch:
                    item.fail(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise

    def _next_batch(self) -> list[BatchItem]:
        """The oldest request and the later ones that can join it (FIFO within its key)."""
        first = self._waiting[0]
        key = batch_key(first.request)
        batch = [first]
        adapters = {first.adapter.name if first.adapter else None}
        if key is not None:
            for item in self._waiting[1:]:
                if len(batch) >= self.max_batch:
                    break
                name = item.adapter.name if item.adapter else None
                fits = name in adapters or len(adapters - {None}) < self.max_adapters
                if batch_key(item.request) == key and (fits or name is None):
                    batch.append(item)
                    adapters.add(name)
        for item in batch:
            self._waiting.remove(item)
        return batch
