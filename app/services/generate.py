"""Generation: validate against the limits, pick the adapter, call the backend, shape the answer.

`GenerateHandler` is the one object both surfaces (`/users/{id}/generate` and the OpenAI-compatible
`/v1/chat/completions`) call. It also retires adapters the backend no longer needs: the previous
active version once a user's active version changes, and all of a deleted user's adapters.
A streamed answer comes out as `StreamEvent`s; the API layer frames them as server-sent events.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import after_commit
from app.core.errors import AppError, InvalidRequest, NotFound, ServiceUnavailable
from app.core.metrics import Metrics
from app.core.security import Principal, validate_user_id
from app.inference import InferenceBackend, build_backend, model_folder
from app.inference.base import GenerationRequest, GenerationResult, StreamDelta, TokenLogprob
from app.inference.tokens import PromptTokenCounter
from app.models import Adapter, User
from app.schemas.generate import (
    ChatCompletion,
    Choice,
    ChoiceLogprobs,
    ChoiceMessage,
    CompletionChoice,
    CompletionLogprobs,
    GenerateOut,
    ModelCard,
    SamplingIn,
    TextCompletion,
    TokenLogprobOut,
    TopLogprob,
    Usage,
)
from app.services import adapters as adapter_service

log = logging.getLogger(__name__)
MODEL_PREFIX = "user:"


@dataclass(frozen=True)
class GenerateCall:
    """A request that passed every check: what to serve it with and what to ask the engine."""

    served: adapter_service.ServedAdapter
    request: GenerationRequest


@dataclass(frozen=True)
class TextChunk:
    """The next piece of a streamed answer's text."""

    text: str


@dataclass(frozen=True)
class StreamEnd:
    """A streamed answer finished: why, and its token counts."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class StreamFailed:
    """The backend failed after the first token (the response has started: report it in-band)."""

    error: AppError


StreamEvent = TextChunk | StreamEnd | StreamFailed
StreamEvents = AsyncGenerator[StreamEvent, None]


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
        *,
        options: dict[str, Any] | None = None,
        stream: bool = False,
    ) -> GenerateCall:
        """Check the limits, resolve the adapter (404 for unknown users and versions).

        `options` are the further GenerationRequest fields the OpenAI surface sets (n, logprobs,
        penalties, logit bias, response format, a raw text prompt).
        """
        served = adapter_service.resolve(session, user_id, selector, self.settings.adapter_store)
        request = self._request(messages, sampling, max_tokens, options or {})
        if stream:
            _check_streamable(request)
        self._note_served(served)
        return GenerateCall(served, request)

    def _request(
        self,
        messages: list[dict[str, str]],
        sampling: SamplingIn,
        max_tokens: int | None,
        options: dict[str, Any],
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
        self._check_prompt_length(messages, options.get("prompt"))
        self._check_logit_bias(options.get("logit_bias", ()))
        return GenerationRequest(
            messages,
            tokens,
            sampling.temperature,
            sampling.top_p,
            sampling.stop_tuple(),
            sampling.seed,
            **options,
        )

    def _check_prompt_length(self, messages: list[dict[str, str]], prompt: str | None) -> None:
        """422 when the (templated) prompt has more tokens than MAX_PROMPT_TOKENS."""
        try:
            count = (
                self.counter.count(messages) if prompt is None else self.counter.count_text(prompt)
            )
        except ValueError as exc:  # the chat template refused the conversation
            raise InvalidRequest(str(exc), "invalid_messages", param="messages") from exc
        if count > self.settings.max_prompt_tokens:
            raise InvalidRequest(
                f"The prompt has {count} tokens; the most this server accepts is "
                f"{self.settings.max_prompt_tokens}",
                "prompt_too_long",
                param="messages" if prompt is None else "prompt",
            )

    def _check_logit_bias(self, bias: tuple[tuple[int, float], ...]) -> None:
        """422 for a token id outside the model's vocabulary (when the tokenizer is known)."""
        size = self.counter.vocab_size
        if size is None:  # estimated counts: the engine itself refuses a bad id
            return
        bad = [token for token, _ in bias if token >= size]
        if bad:
            raise InvalidRequest(
                f"logit_bias names token {bad[0]}; the model's token ids are 0-{size - 1}",
                "invalid_logit_bias",
                param="logit_bias",
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

    async def open_stream(self, call: GenerateCall) -> StreamEvents:
        """The answer as events, once the first token is there; errors before it are raised."""
        started = time.perf_counter()
        deltas = aiter(self.backend.stream(call.request, call.served.adapter))
        first = await anext(deltas)  # a 503/4xx here is still an ordinary error response
        if self.metrics is not None:
            ttft = time.perf_counter() - started
            self.metrics.time_to_first_token.labels(self.backend_name).observe(ttft)
        return self._events(first, deltas, started)

    async def _events(
        self, first: StreamDelta, rest: AsyncIterator[StreamDelta], started: float
    ) -> StreamEvents:
        """Text chunks, then the end (or the failure); the backend's stream is closed either way."""
        last = first
        try:
            if first.text:
                yield TextChunk(first.text)
            async for delta in rest:
                last = delta
                if delta.text:
                    yield TextChunk(delta.text)
        except AppError as exc:
            log.warning("stream failed: %s", exc.message)
            yield StreamFailed(exc)
            return
        finally:
            await _close(rest)
        self._observe_speed(started, last.completion_tokens)
        yield StreamEnd(
            last.finish_reason or "stop", last.prompt_tokens or 0, last.completion_tokens or 0
        )

    # --- retiring adapters ---------------------------------------------------------------------

    def activate(self, session: Session, user_id: str, selector: str) -> adapter_service.Activation:
        """Activate a version; after commit, the previous one is unloaded once idle."""
        activation = adapter_service.activate(
            session, user_id, selector, self.settings.adapter_store
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


def _check_streamable(request: GenerationRequest) -> None:
    """Streams carry one answer without log-probs; say so rather than drop either."""
    if request.n > 1:
        raise InvalidRequest(
            "n > 1 cannot be streamed; ask without stream", "unsupported", param="n"
        )
    if request.logprobs is not None:
        raise InvalidRequest(
            "logprobs cannot be streamed; ask without stream", "unsupported", param="logprobs"
        )


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
    """The OpenAI chat.completion answer (one choice per `n`)."""
    return ChatCompletion(
        id=completion_id(),
        created=int(time.time()),
        model=call.served.model_id,
        choices=[
            Choice(
                index=i,
                message=ChoiceMessage(content=c.text),
                logprobs=_chat_logprobs(c.logprobs),
                finish_reason=c.finish_reason,
            )
            for i, c in enumerate(result.choices)
        ],
        usage=usage_of(result.prompt_tokens, result.completion_tokens),
    )


def text_completion(call: GenerateCall, result: GenerationResult) -> TextCompletion:
    """The OpenAI text_completion answer (one choice per `n`)."""
    return TextCompletion(
        id=completion_id("cmpl-"),
        created=int(time.time()),
        model=call.served.model_id,
        choices=[
            CompletionChoice(
                index=i,
                text=c.text,
                logprobs=_completion_logprobs(c.logprobs),
                finish_reason=c.finish_reason,
            )
            for i, c in enumerate(result.choices)
        ],
        usage=usage_of(result.prompt_tokens, result.completion_tokens),
    )


def _utf8(token: str) -> list[int]:
    """A token's text as OpenAI's `bytes` field gives it."""
    return list(token.encode("utf-8", "surrogatepass"))


def _chat_logprobs(tokens: tuple[TokenLogprob, ...] | None) -> ChoiceLogprobs | None:
    """Chat log-probs: one entry per token, each with its alternatives."""
    if tokens is None:
        return None
    return ChoiceLogprobs(
        content=[
            TokenLogprobOut(
                token=t.token,
                logprob=t.logprob,
                bytes=_utf8(t.token),
                top_logprobs=[TopLogprob(token=a, logprob=lp, bytes=_utf8(a)) for a, lp in t.top],
            )
            for t in tokens
        ]
    )


def _completion_logprobs(tokens: tuple[TokenLogprob, ...] | None) -> CompletionLogprobs | None:
    """Text-completion log-probs: parallel lists, as the legacy API has them."""
    if tokens is None:
        return None
    offsets, offset = [], 0
    for t in tokens:
        offsets.append(offset)
        offset += len(t.token)
    return CompletionLogprobs(
        tokens=[t.token for t in tokens],
        token_logprobs=[t.logprob for t in tokens],
        top_logprobs=[dict(t.top) for t in tokens],
        text_offset=offsets,
    )


def completion_id(prefix: str = "chatcmpl-") -> str:
    """A fresh OpenAI-style completion id."""
    return prefix + secrets.token_hex(12)


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


def list_models(session: Session, principal: Principal, base_model: str) -> list[ModelCard]:
    """Model ids the caller may use: its user's (each version too), or every user's."""
    if principal.is_operator:
        users = session.scalars(select(User).order_by(User.id))
        return [_alias_card(user, base_model) for user in users]
    user = session.get(User, principal.user_id or "")
    if user is None:
        return []
    versions = session.scalars(
        select(Adapter).where(Adapter.user_id == user.id).order_by(Adapter.version)
    )
    return [
        _alias_card(user, base_model),
        _base_card(user, base_model),
        *(_version_card(a, base_model) for a in versions),
    ]


def retrieve_model(
    session: Session, principal: Principal, model: str, base_model: str
) -> ModelCard:
    """One model id's card; 404 for an id that names nothing, 403 for another user's."""
    user_id, selector = parse_model_id(model)
    principal.authorize_user(user_id)
    user = session.get(User, user_id)
    if user is None:
        raise NotFound(f"Model {model!r} does not exist", "model_not_found", param="model")
    target = adapter_service.parse_selector(selector)
    if target == adapter_service.ACTIVE:
        return _alias_card(user, base_model)
    if target == adapter_service.BASE:
        return _base_card(user, base_model)
    adapter = session.scalar(
        select(Adapter).where(Adapter.user_id == user_id, Adapter.version == target)
    )
    if adapter is None:
        raise NotFound(f"Model {model!r} does not exist", "model_not_found", param="model")
    return _version_card(adapter, base_model)


def _alias_card(user: User, base_model: str) -> ModelCard:
    """`user:<id>`: the active version now (root), on the base model (parent) if there is one."""
    version = user.active_adapter_version
    root = f"{MODEL_PREFIX}{user.id}:" + (f"v{version}" if version else adapter_service.BASE)
    return ModelCard(
        id=f"{MODEL_PREFIX}{user.id}",
        created=int(user.created_at.timestamp()),
        owned_by=user.id,
        root=root,
        parent=base_model if version else None,
    )


def _base_card(user: User, base_model: str) -> ModelCard:
    """`user:<id>:base`: the base model itself."""
    return ModelCard(
        id=f"{MODEL_PREFIX}{user.id}:base",
        created=int(user.created_at.timestamp()),
        owned_by=user.id,
        root=base_model,
        parent=None,
    )


def _version_card(adapter: Adapter, base_model: str) -> ModelCard:
    """`user:<id>:v<N>`: one adapter version, trained on the base model."""
    model_id = f"{MODEL_PREFIX}{adapter.user_id}:v{adapter.version}"
    return ModelCard(
        id=model_id,
        created=int(adapter.created_at.timestamp()),
        owned_by=adapter.user_id,
        root=model_id,
        parent=base_model,
    )


# --- wiring -------------------------------------------------------------------------------------


def build_handler(settings: Settings, metrics: Metrics) -> GenerateHandler:
    """The backend the settings choose, behind a handler that reports to `metrics`."""
    backend = build_backend(settings)
    counter = PromptTokenCounter(lambda: model_folder(settings))
    handler = GenerateHandler(backend, settings, counter)
    handler.metrics = metrics
    kind = settings.inference_backend

    def observe_load(seconds: float) -> None:
        metrics.adapter_loads.labels(kind).inc()
        metrics.adapter_load_seconds.labels(kind).observe(seconds)

    backend.on_adapter_load = observe_load
    return handler
