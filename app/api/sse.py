"""Server-sent events: a streamed answer framed as OpenAI's chat.completion.chunk events.

The stream is the role chunk, a content chunk per piece of text, the finish chunk, the usage chunk
(when asked for) and `data: [DONE]`. A failure after the first token cannot change the status line
any more, so it is reported in-band as one error event (as OpenAI does) and the stream ends there.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from app.core.errors import error_body
from app.services.generate import (
    StreamEvent,
    StreamEvents,
    StreamFailed,
    TextChunk,
    completion_id,
    usage_of,
)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = "data: [DONE]\n\n"


def sse_event(data: dict[str, Any]) -> str:
    """One server-sent event carrying `data` as JSON."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class ChunkWriter:
    """Formats chat.completion.chunk events sharing one id, timestamp and model."""

    def __init__(self, model_id: str, extra: dict[str, Any]) -> None:
        self.head = {
            "id": completion_id(),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model_id,
            **extra,
        }

    def delta(self, delta: dict[str, str], finish_reason: str | None = None) -> str:
        """One event with one choice."""
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return sse_event({**self.head, "choices": [choice]})

    def usage(self, prompt_tokens: int, completion_tokens: int) -> str:
        """The final usage event (choices empty), as with stream_options.include_usage."""
        usage = usage_of(prompt_tokens, completion_tokens).model_dump()
        return sse_event({**self.head, "choices": [], "usage": usage})


def sse_response(
    model_id: str,
    events: StreamEvents,
    *,
    include_usage: bool,
    extra: dict[str, Any] | None = None,
) -> StreamingResponse:
    """The streamed answer as a `text/event-stream` response (`extra` goes into every chunk)."""
    frames = sse_frames(events, ChunkWriter(model_id, extra or {}), include_usage)
    return StreamingResponse(frames, media_type="text/event-stream", headers=SSE_HEADERS)


async def sse_frames(
    events: StreamEvents, chunks: ChunkWriter, include_usage: bool
) -> AsyncIterator[str]:
    """Role chunk, then each event's frames; closing the response closes the answer's stream."""
    try:
        yield chunks.delta({"role": "assistant", "content": ""})
        async for event in events:
            for frame in _frames_of(event, chunks, include_usage):
                yield frame
    finally:
        await events.aclose()


def _frames_of(event: StreamEvent, chunks: ChunkWriter, include_usage: bool) -> list[str]:
    """The SSE frames of one event."""
    if isinstance(event, TextChunk):
        return [chunks.delta({"content": event.text})]
    if isinstance(event, StreamFailed):
        error = event.error
        return [sse_event(error_body(error.type, error.message, error.code))]
    finish = [chunks.delta({}, event.finish_reason)]
    usage = [chunks.usage(event.prompt_tokens, event.completion_tokens)] if include_usage else []
    return [*finish, *usage, DONE]
