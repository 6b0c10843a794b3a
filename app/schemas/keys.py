"""API key shapes: the secret appears only in the answer to issuing a key."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from app.schemas.common import ResponseModel, StrictModel
from app.services.api_keys import NAME_MAX_CHARS


class KeyCreate(StrictModel):
    name: str | None = Field(
        None,
        max_length=NAME_MAX_CHARS,
        description="Optional label, e.g. where the key is used (printable, 1-100 characters).",
        examples=["laptop"],
    )


class KeyOut(ResponseModel):
    id: int
    user_id: str
    prefix: str = Field(description="The key's first characters, to tell keys apart.")
    name: str | None
    created_at: datetime
    last_used_at: datetime | None = Field(
        description="When the key last authenticated a request (recorded at most once a minute)."
    )


class KeyCreated(KeyOut):
    api_key: str = Field(description="The secret: shown once, only its hash is stored.")
