"""Generate shapes: our `/users/{id}/generate` and the OpenAI-compatible chat completions."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.inference.base import ResponseFormat
from app.schemas.common import StrictModel

ADAPTER_PATTERN = r"^(active|base|v?[1-9][0-9]{0,8})$"
MAX_STOP_STRINGS = 4
MAX_SEED = 2**32 - 1
MAX_CHOICES = 8
MAX_TOP_LOGPROBS = 20  # OpenAI's limits
MAX_COMPLETION_LOGPROBS = 5
MAX_LOGIT_BIAS = 300


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


class StreamOptions(StrictModel):
    include_usage: bool = False


class JsonSchemaIn(BaseModel):
    """OpenAI's `response_format.json_schema`: the answer is JSON matching `schema`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormatIn(StrictModel):
    """`{"type": "text"}`, JSON mode `{"type": "json_object"}`, or a `json_schema`."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaIn | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormatIn:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("give `json_schema` exactly when type is 'json_schema'")
        return self


class OpenAIRequestIn(SamplingIn):
    """What OpenAI's chat and text completions share.

    An explicit `null` means the default, as in OpenAI's API. Fields we cannot honour are refused
    with a 400 naming them, never silently dropped.
    """

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        max_length=200, description="`user:<id>`, `user:<id>:v<N>` or `user:<id>:base`."
    )
    n: int = Field(1, ge=1, le=MAX_CHOICES, description=f"Answers to generate (1-{MAX_CHOICES}).")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id (as a string) → bias in [-100, 100] added to its logit."
    )
    stream_options: StreamOptions | None = None
    user: str | None = Field(
        None, max_length=256, description="Your end user's id; written to the request log."
    )

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.isdigit() or not -100.0 <= bias <= 100.0:
                raise ValueError("keys are token ids, values biases in [-100, 100]")
        if value and len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens")
        return value

    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def engine_options(self) -> dict[str, Any]:
        """The GenerationRequest fields beyond SamplingIn's."""
        return {
            "n": self.n,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "logit_bias": tuple((int(t), b) for t, b in (self.logit_bias or {}).items()),
        }


class ChatCompletionIn(OpenAIRequestIn):
    """OpenAI's chat-completions request."""

    messages: list[OpenAIMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Alias of max_tokens.")
    logprobs: bool = Field(False, description="Return each answer token's log-probability.")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="Alternatives per token (needs logprobs)."
    )
    response_format: ResponseFormatIn | None = None
    tools: list[Any] | None = Field(None, description="Not supported; must be absent or empty.")
    tool_choice: Literal["none", "auto"] | None = Field(None, description="Only without tools.")
    parallel_tool_calls: bool | None = Field(None, description="Accepted; there are no tools.")

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionIn:
        if self.tools:
            raise ValueError("tools are not supported")
        if any(not m.plain()["content"] for m in self.messages):
            raise ValueError("messages must not be empty")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def chat(self) -> list[dict[str, str]]:
        """The conversation as plain dicts."""
        return [m.plain() for m in self.messages]

    def token_limit(self) -> int | None:
        """max_completion_tokens, else max_tokens."""
        return self.max_completion_tokens or self.max_tokens

    def engine_options(self) -> dict[str, Any]:
        options = super().engine_options()
        if self.logprobs:
            options["logprobs"] = self.top_logprobs or 0
        if self.response_format is not None and self.response_format.type != "text":
            schema = self.response_format.json_schema
            options["response_format"] = ResponseFormat(schema.json_schema if schema else None)
        return options


class CompletionIn(OpenAIRequestIn):
    """OpenAI's (legacy) text-completions request: raw text in, its continuation out."""

    prompt: str | list[str] = Field(description="The text to continue (one prompt).")
    max_tokens: int | None = Field(16, ge=1, description="Most tokens to generate (OpenAI: 16).")
    logprobs: int | None = Field(
        None, ge=0, le=MAX_COMPLETION_LOGPROBS, description="Alternatives per token."
    )
    echo: bool = Field(False, description="Only false: the prompt is not repeated.")
    suffix: None = Field(None, description="Not supported.")
    best_of: int | None = Field(None, ge=1, description="Only equal to n.")

    @model_validator(mode="after")
    def _supported(self) -> CompletionIn:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if len(prompts) != 1 or not prompts[0] or len(prompts[0]) > 200_000:
            raise ValueError("give one prompt of 1-200000 characters")
        if self.echo:
            raise ValueError("echo is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported")
        return self

    def text(self) -> str:
        """The one prompt."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def engine_options(self) -> dict[str, Any]:
        return {**super().engine_options(), "prompt": self.text(), "logprobs": self.logprobs}


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None
    refusal: None = None


class ChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: ChoiceMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str = Field(description="What the id resolves to now (a version, or the base model).")
    parent: str | None = Field(description="The base model an adapter version is trained on.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
