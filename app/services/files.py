"""Stored JSONL files (`/v1/files`): upload in pieces, validated line by line, list, delete.

A file belongs to the uploading key's user, or, uploaded with the operator key, to the operator
(`user_id` None). A user's key reaches only its user's files; the operator's reaches every file.
Never commits.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import BinaryIO, Literal

from sqlalchemy import insert, select, tuple_
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.errors import BadRequest, Forbidden, NotFound, PayloadTooLarge
from app.core.security import Principal
from app.models import FileChunk, StoredFile
from app.services.jsonl import JsonlPairs

PURPOSES = ("fine-tune",)
CHUNK_BYTES = 1024 * 1024  # one `file_chunks` row
READ_BYTES = 64 * 1024


def create_file(
    session: Session,
    principal: Principal,
    filename: str | None,
    purpose: str,
    stream: BinaryIO,
    settings: Settings,
) -> StoredFile:
    """Store an uploaded JSONL file of pairs if every line is a good pair, else raise a 400."""
    if purpose not in PURPOSES:
        raise BadRequest(
            f"purpose: must be one of {list(PURPOSES)}", "invalid_purpose", param="purpose"
        )
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    if not name or len(name) > 255:
        raise BadRequest("file: needs a file name of 1 to 255 characters", param="file")
    row = StoredFile(
        id=f"file-{uuid.uuid4().hex[:24]}",
        user_id=principal.user_id,
        filename=name,
        purpose=purpose,
        bytes=0,
        sha256="",
        pair_count=0,
    )
    session.add(row)
    session.flush()  # the chunks refer to it
    reader = JsonlPairs(settings.pair_limits, settings.max_body_bytes)
    _store_chunks(session, row.id, stream, reader, settings.max_upload_bytes)
    reader.finish(param="file")
    row.bytes, row.sha256, row.pair_count = reader.size, reader.sha256, reader.pairs
    session.flush()
    return row


def _store_chunks(
    session: Session, file_id: str, stream: BinaryIO, reader: JsonlPairs, limit: int
) -> None:
    """Copy the stream into `file_chunks` rows one piece at a time, reading it as it goes."""
    piece, seq = bytearray(), 0
    while chunk := stream.read(READ_BYTES):
        reader.feed(chunk)
        piece += chunk
        if reader.size > limit:
            raise PayloadTooLarge(f"file: larger than {limit} bytes", param="file")
        if len(piece) >= CHUNK_BYTES:
            _insert_chunk(session, file_id, seq, piece)
            piece, seq = bytearray(), seq + 1
    if piece:
        _insert_chunk(session, file_id, seq, piece)


def _insert_chunk(session: Session, file_id: str, seq: int, data: bytearray) -> None:
    # A Core-style insert: the session keeps no object holding the bytes.
    session.execute(insert(FileChunk), [{"file_id": file_id, "seq": seq, "data": bytes(data)}])


def file_chunks(session: Session, file_id: str) -> Iterator[bytes]:
    """A stored file's bytes, one piece (one query) at a time."""
    seq = 0
    while True:
        data = session.scalar(
            select(FileChunk.data).where(FileChunk.file_id == file_id, FileChunk.seq == seq)
        )
        if data is None:
            return
        yield bytes(data)
        seq += 1


def get_file(session: Session, file_id: str, principal: Principal) -> StoredFile:
    """A file the principal may use: NotFound if unknown, Forbidden if someone else's."""
    row = session.get(StoredFile, file_id) if len(file_id) <= 40 else None
    if row is None:
        raise NotFound(f"File {file_id} not found", "file_not_found", param="file_id")
    if not principal.is_operator and row.user_id != principal.user_id:
        raise Forbidden("This file belongs to another owner", "wrong_owner", param="file_id")
    return row


def list_files(
    session: Session,
    principal: Principal,
    limit: int,
    after: str | None,
    order: Literal["asc", "desc"],
    purpose: str | None,
) -> tuple[list[StoredFile], bool]:
    """A page of the files the principal may see (the operator: all), and whether more follow."""
    query = select(StoredFile)
    if not principal.is_operator:
        query = query.where(StoredFile.user_id == principal.user_id)
    if purpose is not None:
        query = query.where(StoredFile.purpose == purpose)
    position = tuple_(StoredFile.created_at, StoredFile.id)
    if after is not None:
        mark = get_file(session, after, principal)
        bound = tuple_(mark.created_at, mark.id)
        query = query.where(position < bound if order == "desc" else position > bound)
    columns = (StoredFile.created_at, StoredFile.id)
    ordered = [c.desc() if order == "desc" else c.asc() for c in columns]
    rows = list(session.scalars(query.order_by(*ordered).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def delete_file(session: Session, file_id: str, principal: Principal) -> None:
    """Delete a file and its bytes (imports made from it stay, with their pairs)."""
    session.delete(get_file(session, file_id, principal))
    session.flush()
