"""Generation: validate against the limits, pick the adapter, call the backend, shape the answer.

`GenerateHandler` is the one object both surfaces (`/users/{id}/generate` and the OpenAI-compatible
`/v1/chat/completions`) call. It also retires adapters the backend no longer needs: the previous
active version once a user's active version changes, and all of a deleted user's adapters.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import after_commit
from app.core.errors import AppError, InvalidRequest, NotFound, ServiceUnavailable, error_body
from app.core.metrics import Metrics
from app.core.security import Principal, validate_user_id
from app.inference import InferenceBackend, build_backend, model_folder
from app.inference.base import GenerationRequest, GenerationResult, StreamDelta
from app.inference.tokens import PromptTokenCounter
from app.models import Adapter, User
from app.schemas.generate import (
    ChatCompletion,
    Choice,
    ChoiceMessage,
    GenerateOut,
    ModelCard,
    SamplingIn,
    Usage,
)
from app.services import adapters as adapter_service

log = logging.getLogger(__name__)
MODEL_PREFIX = "user:"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class GenerateCall:
    """A request that passed every check: what to serve it with and what to ask the engine."""

    served: adapter_service.ServedAdapter
    request: GenerationRequest


class GenerateHandler:
    """Both generate surfaces go through here; the backend is behind it."""

    def __init__(
        self, backend: InferenceBackend, settings: Settings, counter: PromptTokenCounter
    ) -> None:
        self.backend = backend
        self.settings = settings
        self.counter = counter
        self._active: dict[str, str | None] = {}  # user → adapter name last served as active
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.metrics: Metrics | None = None
        self.backend_name = settings.inference_backend

    def start(self) -> None:
        """Remember the event loop, so after-commit callbacks (in threads) can schedule unloads."""
        self._loop = asyncio.get_running_loop()

    # --- before the backend: limits and adapter choice (sync, DB) -----------------------------

    def prepare(
        self,
        session: Session,
        user_id: str,
        selector: str,
        messages: list[dict[str, str]],
        sampling: SamplingIn,
        max_tokens: int | None,
    ) -> GenerateCall:
        """Check the limits, resolve the adapter (404 for unknown users and versions)."""
        served = adapter_service.resolve(session, user_id, selector, self.settings.adapters_path)
        request = self._request(messages, sampling, max_tokens)
        self._note_served(served)
        return GenerateCall(served, request)

    def _request(
        self, messages: list[dict[str, str]], sampling: SamplingIn, max_tokens: int | None
    ) -> GenerationRequest:
        """The engine request, refused with a clear 422 when over a limit."""
        limit = self.settings.max_new_tokens
        tokens = max_tokens or min(self.settings.default_max_tokens, limit)
        if tokens > limit:
            raise InvalidRequest(
                f"max_tokens is {tokens}; the most this server allows is {limit}",
                "max_tokens_too_large",
                param="max_tokens",
            )
        if len(messages) > self.settings.max_messages:
            raise InvalidRequest(
                f"At most {self.settings.max_messages} messages per request",
                "too_many_messages",
                param="messages",
            )
        self._check_prompt_length(messages)
        return GenerationRequest(
            messages,
            tokens,
            sampling.temperature,
            sampling.top_p,
            sampling.stop_tuple(),
            sampling.seed,
        )

    def _check_prompt_length(self, messages: list[dict[str, str]]) -> None:
        """422 when the templated prompt has more tokens than MAX_PROMPT_TOKENS."""
        try:
            count = self.counter.count(messages)
        except ValueError as exc:  # the chat template refused the conversation
            raise InvalidRequest(str(exc), "invalid_messages", param="messages") from exc
        if count > self.settings.max_prompt_tokens:
            raise InvalidRequest(
                f"The prompt has {count} tokens; the most this server accepts is "
                f"{self.settings.max_prompt_tokens}",
                "prompt_too_long",
                param="messages",
            )

    # --- the backend call ----------------------------------------------------------------------

    async def complete(self, call: GenerateCall) -> GenerationResult:
        """The whole answer."""
        started = time.perf_counter()
        result = await self.backend.generate(call.request, call.served.adapter)
        self._observe_speed(started, result.completion_tokens)
        return result

    def _observe_speed(self, started: float, completion_tokens: int | None) -> None:
        elapsed = time.perf_counter() - started
        if self.metrics is not None and completion_tokens:
            self.metrics.generated_tokens.labels(self.backend_name).inc(completion_tokens)
            if elapsed > 0:
                speed = completion_tokens / elapsed
                self.metrics.generate_tokens_per_second.labels(self.backend_name).observe(speed)

    async def event_stream(
        self, call: GenerateCall, *, include_usage: bool, extra: dict[str, Any] | None = None
    ) -> StreamingResponse:
        """SSE of chat.completion.chunk events; errors before the first token stay HTTP errors."""
        started = time.perf_counter()
        deltas = aiter(self.backend.stream(call.request, call.served.adapter))
        first = await anext(deltas)  # a 503/4xx here is still an ordinary error response
        if self.metrics is not None:
            ttft = time.perf_counter() - started
            self.metrics.time_to_first_token.labels(self.backend_name).observe(ttft)
        chunks = ChunkWriter(call.served.model_id, extra or {})
        events = _sse_events(
            first,
            deltas,
            chunks,
            include_usage,
            on_done=lambda tokens: self._observe_speed(started, tokens),
        )
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)

    # --- retiring adapters ---------------------------------------------------------------------

    def activate(self, session: Session, user_id: str, selector: str) -> adapter_service.Activation:
        """Activate a version; after commit, the previous one is unloaded once idle."""
        activation = adapter_service.activate(
            session, user_id, selector, self.settings.adapters_path
        )
        after_commit(session, lambda: self._activated(user_id, activation))
        return activation

    def user_deleted(self, session: Session, user_id: str) -> None:
        """A user_deleted hook: after commit, unload every adapter of that user."""
        after_commit(session, lambda: self._schedule(lambda: self._unload_user(user_id)))

    def _activated(self, user_id: str, activation: adapter_service.Activation) -> None:
        """Remember the new active name; retire the previous one."""
        name = activation.active.name if activation.active else None
        self._active[user_id] = name
        if activation.previous_name and activation.previous_name != name:
            self._retire(activation.previous_name)

    def _note_served(self, served: adapter_service.ServedAdapter) -> None:
        """Seeing a new active version (e.g. published by the worker) retires the one before."""
        if not served.is_active:
            return
        name = served.adapter.name if served.adapter else None
        previous = self._active.get(served.user_id)
        self._active[served.user_id] = name
        if previous and previous != name:
            self._retire(previous)

    def _retire(self, name: str) -> None:
        """Unload `name` once no in-flight request uses it."""
        log.info("retiring adapter %s", name)
        self._schedule(lambda: self.backend.unload(name))

    async def _unload_user(self, user_id: str) -> None:
        """Unload every adapter of a deleted user that the backend holds."""
        self._active.pop(user_id, None)
        pattern = adapter_service.name_pattern(user_id)
        try:
            names = [n for n in await self.backend.loaded_adapters() if pattern.fullmatch(n)]
            for name in names:
                await self.backend.unload(name)
        except ServiceUnavailable as exc:
            log.warning("could not unload adapters of deleted user %s: %s", user_id, exc.message)

    def _schedule(self, make: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run a coroutine on the app's event loop; callable from any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            log.warning("no running event loop: adapter unload skipped")
            return
        loop.call_soon_threadsafe(self._spawn, make)

    def _spawn(self, make: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Start the coroutine as a task and keep a reference until it ends."""
        task = asyncio.get_running_loop().create_task(make())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


# --- response shapes ----------------------------------------------------------------------------


def usage_of(prompt_tokens: int, completion_tokens: int) -> Usage:
    """OpenAI's usage object."""
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def generate_out(call: GenerateCall, result: GenerationResult) -> GenerateOut:
    """The `/users/{id}/generate` answer."""
    return GenerateOut(
        text=result.text,
        adapter_version=call.served.version,
        model=call.served.model_id,
        finish_reason=result.finish_reason,
        usage=usage_of(result.prompt_tokens, result.completion_tokens),
    )


def chat_completion(call: GenerateCall, result: GenerationResult) -> ChatCompletion:
    """The OpenAI chat.completion answer."""
    return ChatCompletion(
        id=_completion_id(),
        created=int(time.time()),
        model=call.served.model_id,
        choices=[
            Choice(message=ChoiceMessage(content=result.text), finish_reason=result.finish_reason)
        ],
        usage=usage_of(result.prompt_tokens, result.completion_tokens),
    )


def _completion_id() -> str:
    """A fresh OpenAI-style completion id."""
    return "chatcmpl-" + secrets.token_hex(12)


class ChunkWriter:
    """Formats chat.completion.chunk events sharing one id, timestamp and model."""

    def __init__(self, model_id: str, extra: dict[str, Any]) -> None:
        self.head = {
            "id": _completion_id(),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model_id,
            **extra,
        }

    def delta(self, delta: dict[str, str], finish_reason: str | None = None) -> str:
        """One event with one choice."""
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return _event({**self.head, "choices": [choice]})

    def usage(self, prompt_tokens: int, completion_tokens: int) -> str:
        """The final usage event (choices empty), as with stream_options.include_usage."""
        usage = usage_of(prompt_tokens, completion_tokens).model_dump()
        return _event({**self.head, "choices": [], "usage": usage})


def _event(data: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _sse_events(
    first: StreamDelta,
    rest: AsyncIterator[StreamDelta],
    chunks: ChunkWriter,
    include_usage: bool,
    on_done: Callable[[int | None], None] | None = None,
) -> AsyncIterator[str]:
    """Role chunk, content chunks, finish chunk, optional usage chunk, then `[DONE]`."""
    yield chunks.delta({"role": "assistant", "content": ""})
    try:
        last = first
        if first.text:
            yield chunks.delta({"content": first.text})
        async for delta in rest:
            last = delta
            if delta.text:
                yield chunks.delta({"content": delta.text})
    except AppError as exc:  # the status line is sent already: report in-band, as OpenAI does
        log.warning("stream failed: %s", exc.message)
        yield _event(error_body(exc.type, exc.message, exc.code))
        return
    finally:
        await _close(rest)
    yield chunks.delta({}, last.finish_reason or "stop")
    if on_done is not None:
        on_done(last.completion_tokens)
    if include_usage:
        yield chunks.usage(last.prompt_tokens or 0, last.completion_tokens or 0)
    yield "data: [DONE]\n\n"


async def _close(deltas: AsyncIterator[StreamDelta]) -> None:
    """Close the backend's stream (frees its adapter reference and stops generation)."""
    aclose = getattr(deltas, "aclose", None)
    if aclose is not None:
        await aclose()


# --- the OpenAI model ids: user:<id>[:v<N>|:base] ------------------------------------------------


def parse_model_id(model: str) -> tuple[str, str]:
    """(user id, adapter selector) from `user:<id>`, `user:<id>:v<N>` or `user:<id>:base`."""
    parts = model.split(":")
    if not model.startswith(MODEL_PREFIX) or len(parts) not in (2, 3):
        raise NotFound(
            f"Model {model!r} does not exist; use 'user:<id>' (see GET /v1/models)",
            "model_not_found",
            param="model",
        )
    user_id = validate_user_id(parts[1])
    if len(parts) == 2:
        return user_id, adapter_service.ACTIVE
    if parts[2] == adapter_service.ACTIVE:
        raise NotFound(
            f"Model {model!r} does not exist; 'user:<id>' already means the active adapter",
            "model_not_found",
            param="model",
        )
    return user_id, parts[2]


def list_models(session: Session, principal: Principal) -> list[ModelCard]:
    """Model ids the caller may use: its user's (each version too), or every user's."""
    if principal.is_operator:
        users = session.execute(select(User.id, User.created_at).order_by(User.id))
        return [_card(f"{MODEL_PREFIX}{uid}", created, uid) for uid, created in users]
    user_id = principal.user_id or ""
    user = session.get(User, user_id)
    if user is None:
        return []
    cards = [
        _card(f"{MODEL_PREFIX}{user_id}", user.created_at, user_id),
        _card(f"{MODEL_PREFIX}{user_id}:base", user.created_at, user_id),
    ]
    versions = session.scalars(
        select(Adapter).where(Adapter.user_id == user_id).order_by(Adapter.version)
    )
    cards += [
        _card(f"{MODEL_PREFIX}{user_id}:v{a.version}", a.created_at, user_id) for a in versions
    ]
    return cards


def _card(model_id: str, created: Any, owner: str) -> ModelCard:
    """One entry of GET /v1/models."""
    return ModelCard(id=model_id, created=int(created.timestamp()), owned_by=owner)


# --- wiring -------------------------------------------------------------------------------------


def install_inference(app: FastAPI, settings: Settings) -> GenerateHandler:
    """Build the backend and handler; register the ready check and the user/shutdown hooks."""
    backend = build_backend(settings)
    counter = PromptTokenCounter(lambda: model_folder(settings))
    handler = GenerateHandler(backend, settings, counter)
    metrics: Metrics = app.state.metrics
    handler.metrics = metrics
    kind = settings.inference_backend

    def observe_load(seconds: float) -> None:
        metrics.adapter_loads.labels(kind).inc()
        metrics.adapter_load_seconds.labels(kind).observe(seconds)

    backend.on_adapter_load = observe_load
    app.state.inference = backend
    app.state.generate_handler = handler
    app.state.ready_checks["inference"] = backend.ready
    app.state.user_deleted_hooks.append(handler.user_deleted)
    app.state.shutdown_hooks.append(backend.aclose)
    return handler
