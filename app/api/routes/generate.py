"""`POST /users/{id}/generate`: answer with the user's adapter, whole or streamed."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from app.api.deps import SessionDep, UserIdDep
from app.core.ratelimit import RATE_LIMITED_DOC, rate_limit
from app.schemas.common import ERROR_RESPONSES
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


def get_handler(request: Request) -> GenerateHandler:
    """The app's generate handler."""
    handler: GenerateHandler = request.app.state.generate_handler
    return handler


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
        extra = {"adapter_version": call.served.version}
        return await handler.event_stream(call, include_usage=True, extra=extra)
    return generate_out(call, await handler.complete(call))
