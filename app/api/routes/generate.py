"""`POST /users/{id}/generate`: answer with the user's adapter, whole or streamed."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from app.api.deps import SessionDep, UserIdDep, rate_limit
from app.api.sse import sse_response
from app.api.state import StateDep
from app.schemas.common import ERROR_RESPONSES, RATE_LIMITED_DOC
from app.schemas.generate import GenerateIn, GenerateOut
from app.services.generate import GenerateHandler, generate_out

router = APIRouter(tags=["generate"], responses=ERROR_RESPONSES)
STREAM_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
        "description": "JSON, or with `stream: true` server-sent chat.completion.chunk events "
        "ending with `data: [DONE]`.",
    }
}


def get_handler(state: StateDep) -> GenerateHandler:
    """The app's generate handler."""
    return state.generate


HandlerDep = Annotated[GenerateHandler, Depends(get_handler)]


@router.post(
    "/users/{user_id}/generate",
    response_model=GenerateOut,
    responses={**STREAM_DOC, **RATE_LIMITED_DOC},
    summary="Generate with the user's adapter",
    dependencies=[Depends(rate_limit("generate"))],
)
async def generate(
    user_id: UserIdDep, session: SessionDep, handler: HandlerDep, body: GenerateIn
) -> Any:
    """Answer `prompt` or `messages` with the active adapter (or `adapter`: base, v<N>)."""
    call = await run_in_threadpool(
        handler.prepare, session, user_id, body.adapter, body.chat(), body, body.max_tokens
    )
    session.close()  # nothing was written: don't hold a connection through the generation
    if body.stream:
        events = await handler.open_stream(call)
        extra = {"adapter_version": call.served.version}
        return sse_response(call.served.model_id, events, include_usage=True, extra=extra)
    return generate_out(call, await handler.complete(call))
