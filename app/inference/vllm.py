"""vLLM backend: an async client of one or more vLLM OpenAI-compatible servers serving LoRAs.

Stateless: a request names its adapter by its immutable versioned name (`user-<id>-v<N>`) and any
server can answer it. Servers started with vLLM's filesystem LoRA resolver
(VLLM_LORA_RESOLVER_CACHE_DIR = the adapter store's `@by-name` folder, foundation.adapter_store)
load a version the first time it is asked for, with no prior call. A server without the resolver
(or a version linked before it was) answers "model does not exist": the adapter is then loaded on
that server through `/v1/load_lora_adapter` and the request retried once there.

Nothing that decides which adapter answers lives in this process: several API replicas may share
the servers. Retired versions are never unloaded from here (another replica may still be
streaming from one); vLLM's own LRU (`--max-loras` slots, `--max-cpu-loras` cache) evicts idle
ones, and version names are never reused, so a stale entry is never asked for again.

With several servers (VLLM_URL a comma-separated list), requests go round-robin; a server that
cannot be reached is skipped for the next one, so a server restart costs no failed request.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
import weakref
from collections.abc import AsyncIterator, Coroutine
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


class VllmReplica:
    """One vLLM server: its HTTP client and the adapters this process loaded there."""

    def __init__(self, base_url: str, headers: dict[str, str], timeout_s: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(CONNECT_TIMEOUT_S, timeout_s)),
        )
        # Weak values: a lock lives while a load holds or awaits it, so names never served again
        # (every retrain makes a new one) do not pile up in a long-running process.
        self.locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def lock(self, name: str) -> asyncio.Lock:
        """Serialises this process's loads of one adapter on this server."""
        lock = self.locks.get(name)
        if lock is None:
            lock = self.locks[name] = asyncio.Lock()
        return lock


class VllmBackend:
    """Client of vLLM servers serving `served_model` with `--enable-lora`."""

    def __init__(
        self,
        base_urls: str | list[str],
        served_model: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 120.0,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        self.servers = [VllmReplica(url, headers, timeout_s) for url in urls]
        self.base_url = ", ".join(server.base_url for server in self.servers)
        self.served_model = served_model
        self._timeout_s = timeout_s
        self._turn = itertools.count()
        self.on_adapter_load: AdapterLoadObserver | None = None

    async def generate(
        self, request: GenerationRequest, adapter: AdapterRef | None
    ) -> GenerationResult:
        """One non-streamed (chat) completion."""
        payload = _payload(request, _model(self.served_model, adapter), stream=False)
        response = await self._complete(_path(request), payload, adapter)
        return _result(response.json())

    async def stream(
        self, request: GenerationRequest, adapter: AdapterRef | None
    ) -> AsyncIterator[StreamDelta]:
        """A streamed (chat) completion, its deltas passed through as they arrive."""
        payload = _payload(request, _model(self.served_model, adapter), stream=True)
        response = await self._complete(_path(request), payload, adapter)
        try:
            async for delta in _deltas(response, self._timeout_s):
                yield delta
        finally:
            await response.aclose()

    async def ready(self) -> tuple[bool, str]:
        """Ready when at least one server answers and serves our base model."""
        checks = await asyncio.gather(*(self._ready(server) for server in self.servers))
        up = [detail for ok, detail in checks if ok]
        if not up:
            return False, "; ".join(detail for _ok, detail in checks)
        if len(self.servers) == 1:
            return True, up[0]
        return True, f"{len(up)}/{len(self.servers)} vLLM servers ready: " + "; ".join(
            detail for _ok, detail in checks
        )

    async def _ready(self, server: VllmReplica) -> tuple[bool, str]:
        try:
            response = await server.http.get("/v1/models", timeout=READY_TIMEOUT_S)
        except httpx.TransportError as exc:
            return False, f"vLLM unreachable at {server.base_url}: {type(exc).__name__}"
        if response.status_code != 200:
            return False, f"vLLM at {server.base_url} answered {response.status_code}"
        ids = {m.get("id") for m in response.json().get("data", [])}
        if self.served_model not in ids:
            return False, f"vLLM at {server.base_url} does not serve {self.served_model!r}"
        return True, f"vLLM at {server.base_url}, {len(ids) - 1} adapter(s) loaded"

    async def loaded_adapters(self) -> set[str]:
        """Adapters the servers hold now (loaded by anyone), from each `/v1/models`."""
        names: set[str] = set()
        for server in self.servers:
            response = await self._guard(
                server, server.http.get("/v1/models", timeout=ADMIN_TIMEOUT_S)
            )
            _raise_for_error(response, "list models")
            names |= {m["id"] for m in response.json().get("data", []) if m.get("parent")}
        return names

    async def unload(self, adapter_name: str) -> None:
        """Nothing: vLLM's LRU retires idle adapters (see the module doc for why)."""
        log.debug("vLLM: %s retired; left to the servers' LRU", adapter_name)

    async def aclose(self) -> None:
        """Close the HTTP clients."""
        for server in self.servers:
            await server.http.aclose()

    # --- a completion: pick a server, skip unreachable ones, load on a resolver miss ----------

    async def _complete(
        self, path: str, payload: dict[str, Any], adapter: AdapterRef | None
    ) -> httpx.Response:
        """Send to the next server (then the others if it cannot be reached); map errors."""
        start = next(self._turn)
        order = [self.servers[(start + i) % len(self.servers)] for i in range(len(self.servers))]
        for index, server in enumerate(order):
            try:
                response = await self._send_completion(server, path, payload, adapter)
            except ServiceUnavailable as exc:
                if exc.code != "inference_unavailable" or index == len(order) - 1:
                    raise
                log.warning("vLLM at %s unreachable; trying the next server", server.base_url)
                continue
            if response.is_error:
                await response.aread()
                await response.aclose()
                _raise_for_error(response, "completion")
            return response
        raise AssertionError("unreachable: the last server's failure is raised")

    async def _send_completion(
        self, server: VllmReplica, path: str, payload: dict[str, Any], adapter: AdapterRef | None
    ) -> httpx.Response:
        """One server: the completion, and on "model does not exist" a load and one retry."""
        response = await self._send(server, path, payload)
        if adapter is not None and await _model_missing(response):
            log.info("vLLM at %s does not know %s: loading it", server.base_url, adapter.name)
            await self._load(server, adapter)
            response = await self._send(server, path, payload)
        return response

    async def _send(
        self, server: VllmReplica, path: str, payload: dict[str, Any]
    ) -> httpx.Response:
        """Send a (chat) completion; the body is left unread when streaming."""
        request = server.http.build_request("POST", path, json=payload)
        return await self._guard(server, server.http.send(request, stream=bool(payload["stream"])))

    async def _load(self, server: VllmReplica, adapter: AdapterRef) -> None:
        """POST /v1/load_lora_adapter on one server; "already loaded" counts as success."""
        async with server.lock(adapter.name):
            started = time.perf_counter()
            body = {"lora_name": adapter.name, "lora_path": str(adapter.path)}
            response = await self._guard(
                server,
                server.http.post("/v1/load_lora_adapter", json=body, timeout=ADMIN_TIMEOUT_S),
            )
            if response.status_code == 400 and "already been loaded" in _error_message(response):
                return
            if response.is_error:
                raise ServiceUnavailable(
                    f"The inference server at {server.base_url} could not load adapter "
                    f"{adapter.name} from {adapter.path}: {_error_message(response)}",
                    "adapter_load_failed",
                )
            if self.on_adapter_load is not None:
                self.on_adapter_load(time.perf_counter() - started)
            log.info("vLLM: loaded adapter %s from %s", adapter.name, adapter.path)

    async def _guard(
        self, server: VllmReplica, call: Coroutine[Any, Any, httpx.Response]
    ) -> httpx.Response:
        """Await an httpx call; unreachable or slow servers become ServiceUnavailable."""
        try:
            return await call
        except httpx.TimeoutException as exc:
            raise ServiceUnavailable(
                f"The inference server at {server.base_url} did not answer in time "
                f"({type(exc).__name__})",
                "inference_timeout",
                headers=RETRY_AFTER,
            ) from exc
        except httpx.TransportError as exc:
            raise ServiceUnavailable(
                f"The inference server at {server.base_url} is unreachable "
                f"({type(exc).__name__}); retry shortly",
                "inference_unavailable",
                headers=RETRY_AFTER,
            ) from exc


def _model(served_model: str, adapter: AdapterRef | None) -> str:
    """The model name to send: the adapter's serving name, or the base model's."""
    return adapter.name if adapter is not None else served_model


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
