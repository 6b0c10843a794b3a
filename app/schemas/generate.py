"""Generate shapes: our `/users/{id}/generate` and the OpenAI-compatible chat completions."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.schemas.common import StrictModel

ADAPTER_PATTERN = r"^(active|base|v?[1-9][0-9]{0,8})$"
MAX_STOP_STRINGS = 4
MAX_SEED = 2**32 - 1


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1, max_length=200_000, description="The text; not empty.")


class SamplingIn(StrictModel):
    """Sampling parameters shared by both surfaces."""

    max_tokens: int | None = Field(
        None,
        ge=1,
        description="Most tokens to generate (at most MAX_NEW_TOKENS; default DEFAULT_MAX_TOKENS).",
    )
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(None, description="Up to 4 stop strings (not returned).")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Makes sampling repeatable.")
    stream: bool = Field(False, description="Server-sent events in OpenAI's chunk format.")

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_STRINGS or any(not s or len(s) > 64 for s in stops):
            raise ValueError("give at most 4 stop strings of 1-64 characters")
        return value

    def stop_tuple(self) -> tuple[str, ...]:
        """The stop strings as a tuple."""
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class GenerateIn(SamplingIn):
    """A prompt (or chat turns) to answer with one of the user's adapters."""

    prompt: str | None = Field(
        None,
        min_length=1,
        max_length=200_000,
        description="A single user turn (or give `messages`).",
    )
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, description="Chat turns (or give `prompt`)."
    )
    adapter: str = Field(
        "active",
        pattern=ADAPTER_PATTERN,
        description="'active' (default; base if none), 'base', or 'v<N>'.",
    )

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerateIn:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        return self

    def chat(self) -> list[dict[str, str]]:
        """The conversation as plain dicts."""
        if self.messages is None:
            return [{"role": "user", "content": self.prompt or ""}]
        return [m.model_dump() for m in self.messages]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateOut(BaseModel):
    text: str
    adapter_version: int | None = Field(description="The adapter version used; None = base model.")
    model: str = Field(description="`user:<id>:v<N>` or `user:<id>:base`.")
    finish_reason: str = Field(description="'stop' (end or stop string) or 'length'.")
    usage: Usage


# --- OpenAI-compatible surface ------------------------------------------------------------------


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class OpenAIMessage(BaseModel):
    """A chat message as OpenAI clients send it (text content, or a list of text parts)."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def plain(self) -> dict[str, str]:
        """Role and text (developer counts as system; text parts joined)."""
        text = (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionIn(SamplingIn):
    """OpenAI's chat-completions request; unknown fields are ignored, as OpenAI clients expect."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(
        max_length=200, description="`user:<id>`, `user:<id>:v<N>` or `user:<id>:base`."
    )
    messages: list[OpenAIMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Alias of max_tokens.")
    n: int = Field(1, ge=1, le=1, description="Only 1 is supported.")
    stream_options: StreamOptions | None = None
    tools: list[Any] | None = Field(None, description="Not supported; must be absent.")

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionIn:
        if self.tools:
            raise ValueError("tools are not supported")
        if any(not m.plain()["content"] for m in self.messages):
            raise ValueError("messages must not be empty")
        return self

    def chat(self) -> list[dict[str, str]]:
        """The conversation as plain dicts."""
        return [m.plain() for m in self.messages]

    def token_limit(self) -> int | None:
        """max_completion_tokens, else max_tokens."""
        return self.max_completion_tokens or self.max_tokens


class ChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: ChoiceMessage
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
