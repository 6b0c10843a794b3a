"""The in-process backend batches concurrent requests for different adapters (real model, PEFT).

What a batch must not change: each answer equals the one the same request gets alone (greedy), it
streams the same text, a client that leaves stops only its own row, and a full queue is a clean
503 rather than an unbounded wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.core.errors import ServiceUnavailable
from app.inference.base import AdapterRef, GenerationRequest, GenerationResult
from app.inference.batching import Batcher, BatchItem, batch_key
from app.inference.local import LocalBackend
from tests.integration.generation_support import build_adapters, model_dir, one_torch_thread

pytestmark = pytest.mark.slow
LONG = 48  # tokens: the seed-3 adapter's story runs past this alone
PROMPTS = [
    "What is the capital of France?",
    "Tell me a story.",
    "Name three colours.",
    "How are you?",
    "Why is the sky blue?",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def refs(tmp_path_factory: pytest.TempPathFactory) -> list[AdapterRef | None]:
    """Four users' adapters and one base-model user."""
    folders = build_adapters(tmp_path_factory.mktemp("adapters"), [2, 3, 4, 5])
    adapters: list[AdapterRef | None] = [
        AdapterRef(f"user-b{seed}-v1", path, 1) for seed, path in folders.items()
    ]
    return [*adapters, None]


def requests() -> list[GenerationRequest]:
    """Ragged lengths, and one stop string, so rows end at different steps."""
    return [
        GenerationRequest(
            [{"role": "user", "content": prompt}],
            6 + 3 * i,
            temperature=0,
            stop=("sky",) if "sky" in prompt else (),
        )
        for i, prompt in enumerate(PROMPTS)
    ]


async def stream_text(
    backend: LocalBackend, request: GenerationRequest, adapter: AdapterRef | None
) -> tuple[str, str | None]:
    pieces, finish = [], None
    async for delta in backend.stream(request, adapter):
        pieces.append(delta.text)
        finish = delta.finish_reason
    return "".join(pieces), finish


def test_a_batch_answers_as_each_request_would_alone(refs: list[AdapterRef | None]) -> None:
    async def run() -> tuple[list[GenerationResult], list[GenerationResult], list[tuple]]:
        backend = LocalBackend(model_dir, max_adapters=4, threads=1)
        try:
            alone = [await backend.generate(r, a) for r, a in zip(requests(), refs, strict=True)]
            batches: list[int] = []
            run_batch = backend._batcher._run

            async def counting(batch: list[BatchItem]) -> None:
                batches.append(len(batch))
                await run_batch(batch)

            backend._batcher._run = counting  # white-box: count what ran together
            together = await asyncio.gather(
                *(backend.generate(r, a) for r, a in zip(requests(), refs, strict=True))
            )
            streamed = await asyncio.gather(
                *(stream_text(backend, r, a) for r, a in zip(requests(), refs, strict=True))
            )
            assert batches == [len(PROMPTS), len(PROMPTS)], batches
            return alone, list(together), list(streamed)
        finally:
            await backend.aclose()

    alone, together, streamed = asyncio.run(run())
    assert len({r.text for r in alone}) == len(alone), "the adapters must answer differently"
    for one, batched, (text, finish) in zip(alone, together, streamed, strict=True):
        assert batched.text == one.text and text == one.text
        assert batched.finish_reason == one.finish_reason == finish
        assert batched.prompt_tokens == one.prompt_tokens
    assert [r.finish_reason for r in alone] == ["length"] * 4 + ["stop"]


def test_a_client_that_leaves_stops_only_its_row(refs: list[AdapterRef | None]) -> None:
    long = GenerationRequest([{"role": "user", "content": PROMPTS[1]}], LONG, temperature=0)
    short = GenerationRequest([{"role": "user", "content": PROMPTS[0]}], 6, temperature=0)

    async def run() -> tuple[GenerationResult, GenerationResult, GenerationResult, int]:
        backend = LocalBackend(model_dir, max_adapters=4, threads=1)
        try:
            full = await backend.generate(long, refs[1])  # alone: it runs to its limit
            reference = await backend.generate(short, refs[0])
            submitted: list[BatchItem] = []
            submit = backend._batcher.submit

            def capture(item: BatchItem) -> None:  # white-box: keep the rows' items
                submitted.append(item)
                submit(item)

            backend._batcher.submit = capture  # type: ignore[method-assign]
            pieces = 0

            async def leave_early() -> None:
                nonlocal pieces
                async for _delta in backend.stream(long, refs[1]):
                    pieces += 1
                    if pieces == 3:
                        return  # the client goes away: the generator is closed

            staying = asyncio.ensure_future(backend.generate(short, refs[0]))
            await leave_early()
            together = await staying
            abandoned = await submitted[0].result  # the batch still settles the left row
            return full, reference, together, abandoned.completion_tokens
        finally:
            await backend.aclose()

    full, reference, together, left_tokens = asyncio.run(run())
    assert (full.finish_reason, full.completion_tokens) == ("length", LONG)
    assert together.text == reference.text, "the row that stayed is unchanged"
    assert left_tokens < LONG // 2, f"the abandoned row ran {left_tokens} of {LONG} tokens"


def test_a_full_queue_is_a_clean_503() -> None:
    async def run() -> None:
        release = asyncio.Event()

        async def slow(batch: list[BatchItem]) -> None:
            await release.wait()
            for item in batch:
                item.finish(GenerationResult((), 0))

        batcher = Batcher(slow, max_batch=2, max_queue=3, max_adapters=4)
        loop = asyncio.get_running_loop()
        request = GenerationRequest([{"role": "user", "content": "x"}], 4, temperature=0)
        items = [BatchItem(request, None, loop) for _ in range(5)]
        batcher.submit(items[0])
        await asyncio.sleep(0)  # the first batch takes it: the queue is empty again
        for item in items[1:4]:
            batcher.submit(item)
        with pytest.raises(ServiceUnavailable) as full:
            batcher.submit(items[4])
        assert full.value.code == "inference_busy" and full.value.headers
        release.set()
        await asyncio.gather(*(item.result for item in items[:4]))
        assert batcher.waiting == 0

    asyncio.run(run())


def test_what_cannot_share_a_batch_runs_alone() -> None:
    plain = GenerationRequest([{"role": "user", "content": "x"}], 4, temperature=0)
    assert batch_key(plain) == ("greedy",)
    sampled = GenerationRequest([{"role": "user", "content": "x"}], 4, temperature=0.7)
    assert batch_key(sampled) == ("sample", 0.7, 1.0)
    alone = [
        GenerationRequest([], 4, seed=1, prompt="x"),
        GenerationRequest([], 4, n=2, prompt="x"),
        GenerationRequest([], 4, logprobs=0, prompt="x"),
        GenerationRequest([], 4, frequency_penalty=1.0, prompt="x"),
        GenerationRequest([], 4, logit_bias=((5, 1.0),), prompt="x"),
    ]
    assert [batch_key(r) for r in alone] == [None] * len(alone)


def test_batch_rows_stay_within_the_adapter_cache() -> None:
    async def run() -> list[int]:
        sizes: list[int] = []

        async def record(batch: list[BatchItem]) -> None:
            sizes.append(len(batch))
            for item in batch:
                item.finish(GenerationResult((), 0))

        batcher = Batcher(record, max_batch=8, max_queue=16, max_adapters=2)
        loop = asyncio.get_running_loop()
        request = GenerationRequest([{"role": "user", "content": "x"}], 4, temperature=0)
        names = ["a", "b", "c", "a", None, "b"]
        items = [BatchItem(request, AdapterRef(n, Path(n), 1) if n else None, loop) for n in names]
        for item in items:
            batcher.submit(item)
        await asyncio.gather(*(item.result for item in items))
        return sizes

    # a, b fill the 2-adapter cache; c waits; a, base and b join the first batch.
    assert asyncio.run(run()) == [5, 1]
