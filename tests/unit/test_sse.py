"""The API layer frames a streamed answer's events as OpenAI chat.completion.chunk SSE frames."""

from __future__ import annotations

import json
from typing import Any

from app.api.sse import ChunkWriter, sse_frames
from app.core.errors import ServiceUnavailable
from app.services.generate import StreamEnd, StreamEvent, StreamEvents, StreamFailed, TextChunk


async def _events(items: list[StreamEvent], closed: list[bool]) -> StreamEvents:
    try:
        for item in items:
            yield item
    finally:
        closed.append(True)


async def _framed(items: list[StreamEvent], include_usage: bool) -> tuple[list[Any], list[bool]]:
    closed: list[bool] = []
    chunks = ChunkWriter("user:alice:v1", {"adapter_version": 1})
    frames = [f async for f in sse_frames(_events(items, closed), chunks, include_usage)]
    assert all(f.startswith("data: ") and f.endswith("\n\n") for f in frames)
    data = [f.removeprefix("data: ").strip() for f in frames]
    return [d if d == "[DONE]" else json.loads(d) for d in data], closed


async def test_role_content_finish_usage_then_done() -> None:
    end = StreamEnd("length", prompt_tokens=5, completion_tokens=2)
    events, closed = await _framed([TextChunk("Hel"), TextChunk("lo"), end], include_usage=True)
    role, first, second, finish, usage, done = events
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [first["choices"][0]["delta"], second["choices"][0]["delta"]] == [
        {"content": "Hel"},
        {"content": "lo"},
    ]
    assert finish["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "length",
    }
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 2,
        "total_tokens": 7,
    }
    assert done == "[DONE]" and closed == [True]
    chunks = [role, first, second, finish, usage]
    assert len({c["id"] for c in chunks}) == 1
    assert {(c["object"], c["model"], c["adapter_version"]) for c in chunks} == {
        ("chat.completion.chunk", "user:alice:v1", 1)
    }


async def test_no_usage_chunk_unless_asked() -> None:
    events, _ = await _framed([StreamEnd("stop", 3, 0)], include_usage=False)
    assert [e if e == "[DONE]" else e["choices"][0]["finish_reason"] for e in events] == [
        None,
        "stop",
        "[DONE]",
    ]


async def test_a_failure_mid_stream_is_one_error_event_and_the_end() -> None:
    failed = StreamFailed(ServiceUnavailable("vLLM dropped the stream", "inference_unavailable"))
    events, closed = await _framed([TextChunk("Hi"), failed], include_usage=True)
    assert len(events) == 3 and set(events[2]) == {"error"}
    assert events[2]["error"]["code"] == "inference_unavailable"
    assert events[2]["error"]["message"] == "vLLM dropped the stream"
    assert closed == [True]


async def test_closing_the_response_early_closes_the_answers_stream() -> None:
    closed: list[bool] = []
    chunks = ChunkWriter("user:alice", {})
    frames = sse_frames(_events([TextChunk("a"), TextChunk("b")], closed), chunks, False)
    await anext(frames)  # the role chunk
    await anext(frames)  # "a"; the client goes away here
    await frames.aclose()
    assert closed == [True]
