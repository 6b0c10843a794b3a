"""OpenAI's file objects (`/v1/files`) and the report of a JSONL import."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from app.models import StoredFile


class FileObject(BaseModel):
    """OpenAI's `file` object. Files are validated when uploaded, so `status` is `processed`."""

    id: str = Field(description="`file-` followed by 24 hex digits.")
    object: Literal["file"] = "file"
    bytes: int
    created_at: int = Field(description="Unix time, seconds.")
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None

    @classmethod
    def of(cls, row: StoredFile) -> FileObject:
        """The API form of a stored file."""
        return cls(
            id=row.id,
            bytes=row.bytes,
            created_at=int(row.created_at.timestamp()),
            filename=row.filename,
            purpose=row.purpose,
        )


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = Field(None, description="Pass as `after` to get the next page.")


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class ImportReportOut(BaseModel):
    object: Literal["feedback.import"] = "feedback.import"
    id: int
    user_id: str
    sha256: str = Field(description="Of the file's bytes: the same file imports once per user.")
    pairs: int = Field(description="Pairs the file holds.")
    created: int = Field(description="Pairs stored by this request (0 if already imported).")
    already_imported: bool
    file_id: str | None = None
    created_at: datetime
