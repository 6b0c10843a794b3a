"""vLLM backend: an async client of a vLLM OpenAI-compatible server with runtime LoRA loading.

Adapters are loaded on demand under their immutable versioned names (`user-<id>-v<N>`) through
`/v1/load_lora_adapter`, with one lock per name so concurrent first requests load once. A server
that restarted forgets runtime-loaded adapters: a chat completion that answers "model does not
exist" makes us reload the adapter and retry once. Superseded adapters are unloaded once no
in-flight request of this process uses them (a reference count per name).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import httpx

from app.core.errors import AppError, BadRequest, RateLimited, ServiceUnavailable
from app.inference.base import (
    AdapterLoadObserver,
    AdapterRef,
    GeneratedText,
    GenerationRequest,
    GenerationResult,
    ResponseFormat,
    StreamDelta,
    TokenLogprob,
)

log = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 5.0
ADMIN_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 2.5
RETRY_AFTER = {"Retry-After": "5"}


class VllmBackend:
    """Client of one vLLM OpenAI server serving `served_model` with `--enable-lora`."""

    def __init__(
        self,
        base_url: str,
        served_model: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 120.0,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.served_model = served_model
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(CONNECT_TIMEOUT_S, timeout_s)),
        )
        self._timeout_s = timeout_s
        self._locks: dict[str, asyncio.Lock] = {}
        self._loaded: set[str] = set()
        self._in_flight: Counter[str] = Counter()
        self._retiring: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.on_adapter_load: AdapterLoadObserver | None = None

    async def generate(
        self, request: GenerationRequest, adapter: AdapterRef | None
    ) -> GenerationResult:
        """One non-streamed chat completion."""
        async with self._using(adapter) as model:
            response = await self._chat(
                _path(request), _payload(request, model, stream=False), adapter
            )
        return _result(response.json())

    async def stream(
        self, request: GenerationRequest, adapter: AdapterRef | None
    ) -> AsyncIterator[StreamDelta]:
        """A streamed chat completion, its deltas passed through as they arrive."""
        async with self._using(adapter) as model:
            payload = _payload(request, model, stream=True)
            response = await self._chat(_path(request), payload, adapter)
            try:
                async for delta in _deltas(response, self._timeout_s):
                    yield delta
            finally:
                await response.aclose()

    async def ready(self) -> tuple[bool, str]:
        """Ready when the server answers and serves our base model."""
        try:
            response = await self._http.get("/v1/models", timeout=READY_TIMEOUT_S)
        except httpx.TransportError as exc:
            return False, f"vLLM unreachable at {self.base_url}: {type(exc).__name__}"
        if response.status_code != 200:
            return False, f"vLLM at {self.base_url} answered {response.status_code}"
        ids = {m.get("id") for m in response.json().get("data", [])}
        if self.served_model not in ids:
            return False, f"vLLM at {self.base_url} does not serve {self.served_model!r}"
        return True, f"vLLM at {self.base_url}, {len(ids) - 1} adapter(s) loaded"

    async def loaded_adapters(self) -> set[str]:
        """Adapters the server holds now (loaded by any client), from `/v1/models`."""
        response = await self._send("GET", "/v1/models", timeout=ADMIN_TIMEOUT_S)
        _raise_for_error(response, "list models")
        models = response.json().get("data", [])
        return {m["id"] for m in models if m.get("parent") is not None}

    async def unload(self, adapter_name: str) -> None:
        """Unload now if idle, else when the last in-flight request using it finishes."""
        self._retiring.add(adapter_name)
        if self._in_flight[adapter_name] == 0:
            await self._unload_if_retiring(adapter_name)

    async def aclose(self) -> None:
        """Close the HTTP client and stop pending background unloads."""
        for task in list(self._tasks):
            task.cancel()
        await self._http.aclose()

    # --- adapters: load on demand, count users, unload when retired and idle ----------------

    @asynccontextmanager
    async def _using(self, adapter: AdapterRef | None) -> AsyncIterator[str]:
        """The model name to send, with the adapter loaded and counted as in use meanwhile."""
        if adapter is None:
            yield self.served_model
            return
        name = adapter.name
        self._in_flight[name] += 1
        self._retiring.discard(name)  # asked for again (e.g. a rollback): keep it
        try:
            await self._ensure_loaded(adapter)
            yield name
        finally:
            self._in_flight[name] -= 1
            if self._in_flight[name] == 0:
                del self._in_flight[name]
                if name in self._retiring:
                    self._spawn(self._unload_if_retiring(name))

    async def _ensure_loaded(self, adapter: AdapterRef, *, reload: bool = False) -> None:
        """Load the adapter once, whatever the number of concurrent first requests."""
        if adapter.name in self._loaded and not reload:
            return
        async with self._lock(adapter.name):
            if adapter.name in self._loaded and not reload:
                return
            started = time.perf_counter()
            await self._load(adapter)
            self._loaded.add(adapter.name)
            if self.on_adapter_load is not None:
                self.on_adapter_load(time.perf_counter() - started)

    async def _load(self, adapter: AdapterRef) -> None:
        """POST /v1/load_lora_adapter; "already loaded" counts as success."""
        body = {"lora_name": adapter.name, "lora_path": str(adapter.path)}
        response = await self._send(
            "POST", "/v1/load_lora_adapter", json=body, timeout=ADMIN_TIMEOUT_S
        )
        if response.status_code == 400 and "already been loaded" in _error_message(response):
            return
        if response.is_error:
            raise ServiceUnavailable(
                f"The inference server could not load adapter {adapter.name} from {adapter.path}: "
                f"{_error_message(response)}",
                "adapter_load_failed",
            )
        log.info("vLLM: loaded adapter %s from %s", adapter.name, adapter.path)

    async def _unload_if_retiring(self, name: str) -> None:
        """Unload a retired adapter unless a request took it up again meanwhile."""
        async with self._lock(name):
            if name not in self._retiring or self._in_flight[name] > 0:
                return
            try:
                response = await self._send(
                    "POST",
                    "/v1/unload_lora_adapter",
                    json={"lora_name": name},
                    timeout=ADMIN_TIMEOUT_S,
                )
            except ServiceUnavailable as exc:  # a server that is down holds no adapters anyway
                log.warning("vLLM: could not unload %s: %s", name, exc.message)
                return
            if response.is_error and response.status_code != 404:
                log.warning("vLLM: unloading %s failed: %s", name, _error_message(response))
                return
            self._retiring.discard(name)
            self._loaded.discard(name)
            log.info("vLLM: unloaded adapter %s", name)

    def _lock(self, name: str) -> asyncio.Lock:
        """The lock serialising load/unload of one adapter name."""
        return self._locks.setdefault(name, asyncio.Lock())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a background coroutine, keeping a reference until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- HTTP -----------------------------------------------------------------------------------

    async def _chat(
        self, path: str, payload: dict[str, Any], adapter: AdapterRef | None
    ) -> httpx.Response:
        """POST a (chat) completion; reload a forgotten adapter and retry once; map errors."""
        response = await self._send_chat(path, payload)
        if adapter is not None and await _model_missing(response):
            log.warning("vLLM does not know %s (restarted?): reloading it", adapter.name)
            await self._ensure_loaded(adapter, reload=True)
            response = await self._send_chat(path, payload)
        if response.is_error:
            await response.aread()
            await response.aclose()
            _raise_for_error(response, "chat completion")
        return response

    async def _send_chat(self, path: str, payload: dict[str, Any]) -> httpx.Response:
        """Send a (chat) completion; the body is left unread when streaming."""
        request = self._http.build_request("POST", path, json=payload)
        return await self._guard(self._http.send(request, stream=bool(payload["stream"])))

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request with transport failures mapped to 503."""
        return await self._guard(self._http.request(method, path, **kwargs))

    async def _guard(self, call: Coroutine[Any, Any, httpx.Response]) -> httpx.Response:
        """Await an httpx call; unreachable or slow servers become ServiceUnavailable."""
        try:
            return await call
        except httpx.TimeoutException as exc:
            raise ServiceUnavailable(
                f"The inference server at {self.base_url} did not answer in time "
                f"({type(exc).__name__})",
                "inference_timeout",
                headers=RETRY_AFTER,
            ) from exc
        except httpx.TransportError as exc:
            raise ServiceUnavailable(
                f"The inference server at {self.base_url} is unreachable ({type(exc).__name__}); "
                "retry shortly",
                "inference_unavailable",
                headers=RETRY_AFTER,
            ) from exc


def _payload(request: GenerationRequest, model: str, *, stream: bool) -> dict[str, Any]:
    """The OpenAI chat-completions (or, for a text prompt, completions) body vLLM expects."""
    payload: dict[str, Any] = {
        "model": model,
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "n": request.n,
        "stream": stream,
    }
    if request.prompt is not None:
        payload["prompt"] = request.prompt
        if request.logprobs is not None:
            payload["logprobs"] = request.logprobs
    else:
        payload["messages"] = request.messages
        if request.logprobs is not None:
            payload["logprobs"] = True
            payload["top_logprobs"] = request.logprobs
    if request.stop:
        payload["stop"] = list(request.stop)
    if request.seed is not None:
        payload["seed"] = request.seed
    if request.presence_penalty:
        payload["presence_penalty"] = request.presence_penalty
    if request.frequency_penalty:
        payload["frequency_penalty"] = request.frequency_penalty
    if request.logit_bias:
        payload["logit_bias"] = {str(token): bias for token, bias in request.logit_bias}
    if request.response_format is not None:
        payload["response_format"] = _response_format(request.response_format)
    if stream:
        payload["stream_options"] = {"include_usage": True}
    return payload


def _response_format(response_format: ResponseFormat) -> dict[str, Any]:
    """OpenAI's response_format for JSON mode, or for a JSON schema."""
    if response_format.schema is None:
        return {"type": "json_object"}
    return {
        "type": "json_schema",
        "json_schema": {"name": "response", "schema": response_format.schema},
    }


def _path(request: GenerationRequest) -> str:
    """The vLLM route: chat completions, or completions for a raw text prompt."""
    return "/v1/completions" if request.prompt is not None else "/v1/chat/completions"


def _result(body: dict[str, Any]) -> GenerationResult:
    """GenerationResult from a chat.completion or text_completion body."""
    choices = sorted(body["choices"], key=lambda c: int(c.get("index", 0)))
    usage = body.get("usage") or {}
    prompt_tokens = int(usage.get("prompt_tokens", 0))
    # vLLM reports usage for all n answers together; split it evenly when it gives no per-choice
    # counts (each answer's own length is what the choices' token logprobs count, if asked).
    total = int(usage.get("completion_tokens", 0))
    share, extra = divmod(total, max(len(choices), 1))
    out = []
    for i, choice in enumerate(choices):
        text = choice["text"] if "text" in choice else (choice.get("message") or {}).get("content")
        out.append(
            GeneratedText(
                text or "",
                choice.get("finish_reason") or "stop",
                share + (1 if i < extra else 0),
                _logprobs(choice.get("logprobs")),
            )
        )
    return GenerationResult(tuple(out), prompt_tokens)


def _logprobs(value: dict[str, Any] | None) -> tuple[TokenLogprob, ...] | None:
    """Token log-probs from a chat choice (`content` list) or a completions choice (lists)."""
    if not value:
        return None
    if "content" in value:
        return tuple(
            TokenLogprob(
                t["token"],
                float(t["logprob"]),
                tuple((a["token"], float(a["logprob"])) for a in t.get("top_logprobs") or []),
            )
            for t in value["content"] or []
        )
    tops = value.get("top_logprobs") or []
    return tuple(
        TokenLogprob(
            token,
            float(logprob),
            tuple((k, float(v)) for k, v in (tops[i] or {}).items()) if i < len(tops) else (),
        )
        for i, (token, logprob) in enumerate(
            zip(value.get("tokens") or [], value.get("token_logprobs") or [], strict=False)
        )
    )


async def _deltas(response: httpx.Response, timeout_s: float) -> AsyncIterator[StreamDelta]:
    """StreamDeltas from vLLM's server-sent chunk events (chat or text completion)."""
    finish: str | None = None
    usage: dict[str, Any] = {}
    async for chunk in _events(response, timeout_s):
        if "error" in chunk:
            raise ServiceUnavailable(
                f"The inference server failed mid-stream: "
                f"{chunk['error'].get('message', chunk['error'])}",
                "inference_error",
            )
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices", []):
            finish = choice.get("finish_reason") or finish
            text = choice.get("text") or (choice.get("delta") or {}).get("content")
            if text:
                yield StreamDelta(text)
    yield StreamDelta(
        "", finish or "stop", usage.get("prompt_tokens"), usage.get("completion_tokens")
    )


async def _events(response: httpx.Response, timeout_s: float) -> AsyncIterator[dict[str, Any]]:
    """The JSON payloads of `data:` lines, up to `[DONE]`."""
    try:
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                return
            yield json.loads(data)
    except httpx.TimeoutException as exc:
        raise ServiceUnavailable(
            f"The inference server stalled for over {timeout_s}s mid-stream", "inference_timeout"
        ) from exc
    except httpx.TransportError as exc:
        raise ServiceUnavailable(
            f"The inference server dropped the stream ({type(exc).__name__})",
            "inference_unavailable",
            headers=RETRY_AFTER,
        ) from exc


async def _model_missing(response: httpx.Response) -> bool:
    """True when vLLM answered 404 "model does not exist" (it forgot a runtime-loaded adapter)."""
    if response.status_code != 404:
        return False
    await response.aread()
    await response.aclose()
    return "does not exist" in _error_message(response)


def _error_message(response: httpx.Response) -> str:
    """vLLM's error message (its body is `{"error": {"message": ...}}`), or the raw text."""
    try:
        error = response.json().get("error")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return response.text[:500]
    if isinstance(error, dict):
        return str(error.get("message", error))
    return str(error or response.text[:500])


def _raise_for_error(response: httpx.Response, what: str) -> None:
    """Map a vLLM error onto ours: its 4xx stay 4xx, a missing model and 5xx become 503."""
    if not response.is_error:
        return
    detail = _error_message(response)
    status = response.status_code
    error: AppError
    if status == 429:
        error = RateLimited(
            f"The inference server is busy: {detail}", "inference_busy", headers=RETRY_AFTER
        )
    elif status == 404:  # our own model names are checked first: vLLM is misconfigured
        error = ServiceUnavailable(
            f"The inference server lacks a model for the {what}: {detail}",
            "inference_model_missing",
        )
    elif 400 <= status < 500:
        error = BadRequest(
            f"The inference server refused the {what}: {detail}", "inference_rejected"
        )
    else:
        error = ServiceUnavailable(
            f"The inference server failed the {what}: {detail}",
            "inference_error",
            headers=RETRY_AFTER,
        )
    raise error
