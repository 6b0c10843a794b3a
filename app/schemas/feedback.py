"""Preference-pair shapes: our own pair, the OpenAI/Together preference shape, and batches."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    model_validator,
)

from app.schemas.common import Message, ResponseModel, StrictModel


class PairIn(StrictModel):
    """One preference pair: a prompt (or chat turns ending with a user turn), chosen, rejected."""

    prompt: str | None = Field(None, description="A single user prompt (or give `messages`).")
    messages: list[Message] | None = Field(None, description="Chat turns ending with a user turn.")
    chosen: str = Field(description="The answer the user preferred.")
    rejected: str = Field(description="The answer the user did not prefer.")
    metadata: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_prompt(self) -> PairIn:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        return self


class ContentPart(BaseModel):
    """A content part; only `{"type": "text", "text": ...}` can be trained on."""

    model_config = ConfigDict(extra="allow")  # other kinds are refused by name, not as unknown

    type: str
    text: str | None = None


class PreferenceMessage(StrictModel):
    """A chat message as OpenAI's preference lines carry it (`developer` = system).

    Tool turns and tool calls are accepted here only to be refused with a clear message by the
    one pair validator (foundation.pairs), which reads this shape for every way in.
    """

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    function_call: Any = None


class PreferenceInput(StrictModel):
    messages: list[PreferenceMessage]
    tools: list[Any] | None = Field(None, description="Must be empty: tools cannot be trained on.")
    parallel_tool_calls: bool | None = Field(None, description="Accepted and ignored.")


class OpenAIPreferenceIn(StrictModel):
    """OpenAI's preference (DPO) fine-tuning line, also used by Together."""

    input: PreferenceInput
    preferred_output: list[PreferenceMessage] = Field(min_length=1, max_length=1)
    non_preferred_output: list[PreferenceMessage] = Field(min_length=1, max_length=1)
    metadata: dict[str, Any] | None = None


def _pair_tag(value: Any) -> str:
    if isinstance(value, dict) and ("preferred_output" in value or "input" in value):
        return "openai"
    if isinstance(value, BaseModel):
        return "openai" if isinstance(value, OpenAIPreferenceIn) else "pair"
    return "pair"


AnyPair = Annotated[
    Annotated[PairIn, Tag("pair")] | Annotated[OpenAIPreferenceIn, Tag("openai")],
    Discriminator(_pair_tag),
]


class PairBatchIn(StrictModel):
    pairs: list[AnyPair] = Field(min_length=1, description="Up to MAX_BATCH_PAIRS pairs.")


def _feedback_tag(value: Any) -> str:
    if (isinstance(value, dict) and "pairs" in value) or isinstance(value, PairBatchIn):
        return "batch"
    return _pair_tag(value)


FeedbackIn = Annotated[
    Annotated[PairIn, Tag("pair")]
    | Annotated[OpenAIPreferenceIn, Tag("openai")]
    | Annotated[PairBatchIn, Tag("batch")],
    Discriminator(_feedback_tag),
]


class PairOut(ResponseModel):
    id: int
    user_id: str
    messages: list[Message]
    chosen: str
    rejected: str
    # the row's attribute is `meta` (`metadata` is taken on an ORM model)
    metadata: dict[str, Any] | None = Field(validation_alias=AliasChoices("meta", "metadata"))
    created_at: datetime


class FeedbackCreated(BaseModel):
    object: Literal["list"] = "list"
    created: int
    pairs: list[PairOut]
