"""OpenAI's `/v1/files`: upload a JSONL file of preference pairs, list, read, delete.

A file belongs to the key's user; one uploaded with the operator key is the operator's own (only
the operator sees it, and may import it into any user). The operator sees every file.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Path, Query, UploadFile

from app.api.deps import PrincipalDep, SessionDep, SettingsDep
from app.schemas.common import ERROR_RESPONSES
from app.schemas.files import FileDeleted, FileList, FileObject
from app.services import files as file_service

router = APIRouter(prefix="/v1/files", tags=["openai"], responses=ERROR_RESPONSES)
FileIdPath = Annotated[str, Path(max_length=64, description="`file-…`")]


@router.post("", response_model=FileObject, summary="Upload a JSONL file of preference pairs")
def upload_file(
    principal: PrincipalDep,
    session: SessionDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="JSONL, one preference pair a line.")],
    purpose: Annotated[str, Form(description="`fine-tune`.")],
) -> FileObject:
    """Store the file if every line is a pair we can train on; else 400 listing the bad lines."""
    row = file_service.create_file(session, principal, file.filename, purpose, file.file, settings)
    return FileObject.of(row)


@router.get("", response_model=FileList, summary="List files")
def list_files(
    principal: PrincipalDep,
    session: SessionDep,
    after: Annotated[str | None, Query(max_length=64, description="A file id.")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Annotated[Literal["asc", "desc"], Query()] = "desc",
    purpose: Annotated[str | None, Query(max_length=32)] = None,
) -> FileList:
    """The caller's files (the operator: every file), newest first by default."""
    rows, has_more = file_service.list_files(session, principal, limit, after, order, purpose)
    data = [FileObject.of(row) for row in rows]
    first, last = (data[0].id, data[-1].id) if data else (None, None)
    return FileList(data=data, has_more=has_more, first_id=first, last_id=last)


@router.get("/{file_id}", response_model=FileObject, summary="Get a file")
def get_file(principal: PrincipalDep, session: SessionDep, file_id: FileIdPath) -> FileObject:
    """One file's object."""
    return FileObject.of(file_service.get_file(session, file_id, principal))


@router.delete("/{file_id}", response_model=FileDeleted, summary="Delete a file")
def delete_file(principal: PrincipalDep, session: SessionDep, file_id: FileIdPath) -> FileDeleted:
    """Delete the file (pairs already imported from it stay)."""
    file_service.delete_file(session, file_id, principal)
    return FileDeleted(id=file_id)
