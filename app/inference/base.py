"""The inference interface shared by the vLLM and in-process backends, and its value types."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class AdapterRef:
    """A published adapter: immutable versioned name (`user-<id>-v<N>`), its folder and version."""

    name: str
    path: Path
    version: int


@dataclass(frozen=True)
class GenerationRequest:
    """One generation, already validated against the service limits.

    A chat request has `messages` (the chat template applies); a text completion has `prompt`
    instead (raw text, no template). `n` answers share the prompt. `logprobs` None asks for none;
    k >= 0 asks for each generated token's log-probability and the k likeliest alternatives.
    Penalties and `logit_bias` follow OpenAI's definitions (additive, on the logits).
    """

    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None
    n: int = 1
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    response_format: ResponseFormat | None = None
    prompt: str | None = None

    @property
    def greedy(self) -> bool:
        """Temperature 0 means greedy decoding (argmax), as in vLLM and OpenAI."""
        return self.temperature == 0.0


@dataclass(frozen=True)
class ResponseFormat:
    """Constrained output: any JSON object (`schema` None), or JSON matching `schema`."""

    schema: dict[str, Any] | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its text, log-probability, and the likeliest alternatives."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class GeneratedText:
    """One answer (a choice): its text, why it ended, its length, and log-probs if asked."""

    text: str
    finish_reason: str
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class GenerationResult:
    """The answers of a finished generation (one per `n`) and the prompt's token count."""

    choices: tuple[GeneratedText, ...]
    prompt_tokens: int

    @property
    def text(self) -> str:
        """The first answer's text."""
        return self.choices[0].text

    @property
    def finish_reason(self) -> str:
        """Why the first answer ended."""
        return self.choices[0].finish_reason

    @property
    def completion_tokens(self) -> int:
        """Tokens generated over all answers (what usage reports)."""
        return sum(c.completion_tokens for c in self.choices)


@dataclass(frozen=True)
class StreamDelta:
    """A piece of streamed text; the last one carries the finish reason and the token counts."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


AdapterLoadObserver = Callable[[float], None]


@runtime_checkable
class InferenceBackend(Protocol):
    """What the generate service needs from an inference engine (adapter None = the base model)."""

    on_adapter_load: AdapterLoadObserver | None  # called with the seconds each adapter load took

    async def generate(
        self, request: GenerationRequest, adapter: AdapterRef | None
    ) -> GenerationResult:
        """Generate the whole answer."""
        ...

    def stream(
        self, request: GenerationRequest, adapter: AdapterRef | None
    ) -> AsyncIterator[StreamDelta]:
        """Generate the answer piece by piece; the last delta has `finish_reason` set."""
        ...

    async def ready(self) -> tuple[bool, str]:
        """(ok, detail) for /readyz."""
        ...

    async def loaded_adapters(self) -> set[str]:
        """Names of the adapters the engine holds right now."""
        ...

    async def unload(self, adapter_name: str) -> None:
        """Drop an adapter once no in-flight request uses it (a no-op if it is not loaded)."""
        ...

    async def aclose(self) -> None:
        """Release connections, threads and memory."""
        ...
