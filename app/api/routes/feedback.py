"""Preference feedback: store (idempotent), page through, delete."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Path, Query, Response
from fastapi.responses import JSONResponse

from app.api.deps import LimitDep, SessionDep, SettingsDep, UserIdDep
from app.api.state import StateDep
from app.schemas.common import ERROR_RESPONSES, Page
from app.schemas.feedback import FeedbackCreated, FeedbackIn, PairOut
from app.services import feedback as feedback_service
from app.services import users as user_service

router = APIRouter(prefix="/users/{user_id}/feedback", tags=["feedback"], responses=ERROR_RESPONSES)

FEEDBACK_EXAMPLES: dict[str, Any] = {
    "pair": {
        "summary": "One pair",
        "value": {
            "prompt": "Explain recursion.",
            "chosen": "A function calling itself...",
            "rejected": "Recursion is recursion.",
        },
    },
    "batch": {
        "summary": "A batch",
        "value": {
            "pairs": [
                {
                    "messages": [{"role": "user", "content": "Hi"}],
                    "chosen": "Hello!",
                    "rejected": "What.",
                }
            ]
        },
    },
    "openai": {
        "summary": "OpenAI/Together preference shape",
        "value": {
            "input": {"messages": [{"role": "user", "content": "Hi"}]},
            "preferred_output": [{"role": "assistant", "content": "Hello!"}],
            "non_preferred_output": [{"role": "assistant", "content": "What."}],
        },
    },
}


@router.post("", status_code=201, response_model=FeedbackCreated, summary="Store preference pairs")
def post_feedback(
    state: StateDep,
    user_id: UserIdDep,
    session: SessionDep,
    settings: SettingsDep,
    body: Annotated[FeedbackIn, Body(openapi_examples=FEEDBACK_EXAMPLES)],
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)] = None,
) -> Any:
    """Store one pair or a batch; committed before the 201. A retried Idempotency-Key replays."""
    user_service.get_user(session, user_id)
    pairs = feedback_service.normalize(body, settings)
    result = feedback_service.store_pairs(session, user_id, pairs, idempotency_key)
    headers = {"Idempotent-Replayed": "true"} if result.replayed else {}
    if not result.replayed:
        state.metrics.pairs_stored.inc(len(pairs))
    return JSONResponse(result.body, status_code=result.status_code, headers=headers)


@router.get("", response_model=Page[PairOut], summary="List pairs, newest first")
def list_feedback(
    user_id: UserIdDep,
    session: SessionDep,
    limit: LimitDep,
    cursor: Annotated[str | None, Query(max_length=32, description="From `next_cursor`.")] = None,
) -> Page[PairOut]:
    """Cursor-paged pairs, newest first."""
    user_service.get_user(session, user_id)
    page = feedback_service.list_pairs(session, user_id, limit, cursor)
    return Page[PairOut].model_validate(page)


@router.delete("/{pair_id}", status_code=204, summary="Delete a pair")
def delete_feedback(
    user_id: UserIdDep, session: SessionDep, pair_id: Annotated[int, Path(ge=1, le=2**62)]
) -> Response:
    """Delete one pair of this user."""
    user_service.get_user(session, user_id)
    feedback_service.delete_pair(session, user_id, pair_id)
    return Response(status_code=204)
