"""Preference-pair shapes: our own pair, the OpenAI/Together preference shape, and batches."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, Discriminator, Field, Tag, model_validator

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


class PreferenceInput(StrictModel):
    messages: list[Message]


class OpenAIPreferenceIn(StrictModel):
    """The preference-tuning shape used by OpenAI and Together."""

    input: PreferenceInput
    preferred_output: list[Message] = Field(min_length=1, max_length=1)
    non_preferred_output: list[Message] = Field(min_length=1, max_length=1)
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
