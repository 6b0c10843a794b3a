"""Server-sent events: a streamed answer framed as OpenAI's chunk events (chat or text).

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

    object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def __init__(self, model_id: str, extra: dict[str, Any]) -> None:
        self.head = {
            "id": completion_id(self.id_prefix),
            "object": self.object,
            "created": int(time.time()),
            "model": model_id,
            **extra,
        }

    def start(self) -> list[str]:
        """What opens the stream: the assistant role."""
        return [self.delta({"role": "assistant", "content": ""})]

    def text(self, text: str) -> str:
        """A piece of the answer."""
        return self.delta({"content": text})

    def finish(self, finish_reason: str) -> str:
        """The last content event: why the answer ended."""
        return self.delta({}, finish_reason)

    def delta(self, delta: dict[str, str], finish_reason: str | None = None) -> str:
        """One event with one choice."""
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return sse_event({**self.head, "choices": [choice]})

    def usage(self, prompt_tokens: int, completion_tokens: int) -> str:
        """The final usage event (choices empty), as with stream_options.include_usage."""
        usage = usage_of(prompt_tokens, completion_tokens).model_dump()
        return sse_event({**self.head, "choices": [], "usage": usage})


class TextChunkWriter(ChunkWriter):
    """Formats a streamed text completion: `text_completion` events with `text` choices."""

    object = "text_completion"
    id_prefix = "cmpl-"

    def start(self) -> list[str]:
        return []

    def text(self, text: str) -> str:
        return self._choice(text, None)

    def finish(self, finish_reason: str) -> str:
        return self._choice("", finish_reason)

    def _choice(self, text: str, finish_reason: str | None) -> str:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return sse_event({**self.head, "choices": [choice]})


def sse_response(
    model_id: str,
    events: StreamEvents,
    *,
    include_usage: bool,
    extra: dict[str, Any] | None = None,
    writer: type[ChunkWriter] = ChunkWriter,
) -> StreamingResponse:
    """The streamed answer as a `text/event-stream` response (`extra` goes into every chunk)."""
    frames = sse_frames(events, writer(model_id, extra or {}), include_usage)
    return StreamingResponse(frames, media_type="text/event-stream", headers=SSE_HEADERS)


async def sse_frames(
    events: StreamEvents, chunks: ChunkWriter, include_usage: bool
) -> AsyncIterator[str]:
    """The opening chunk, then each event's frames; closing the response closes the stream."""
    try:
        for frame in chunks.start():
            yield frame
        async for event in events:
            for frame in _frames_of(event, chunks, include_usage):
                yield frame
    finally:
        await events.aclose()


def _frames_of(event: StreamEvent, chunks: ChunkWriter, include_usage: bool) -> list[str]:
    """The SSE frames of one event."""
    if isinstance(event, TextChunk):
        return [chunks.text(event.text)]
    if isinstance(event, StreamFailed):
        error = event.error
        return [sse_event(error_body(error.type, error.message, error.code))]
    finish = [chunks.finish(event.finish_reason)]
    usage = [chunks.usage(event.prompt_tokens, event.completion_tokens)] if include_usage else []
    return [*finish, *usage, DONE]
