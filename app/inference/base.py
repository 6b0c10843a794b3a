"""The inference interface shared by the vLLM and in-process backends, and its value types."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class AdapterRef:
    """A published adapter: immutable versioned name (`user-<id>-v<N>`), its folder and version."""

    name: str
    path: Path
    version: int


@dataclass(frozen=True)
class GenerationRequest:
    """One chat generation, already validated against the service limits."""

    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        """Temperature 0 means greedy decoding (argmax), as in vLLM and OpenAI."""
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerationResult:
    """The text of a finished generation and its token counts."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


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
