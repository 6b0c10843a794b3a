"""OpenAI-compatible surface: `POST /v1/chat/completions` and `GET /v1/models`.

The model id names the user (`user:<id>`, optionally `:v<N>` or `:base`); the key must own that
user (the operator key may use any).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from app.api.deps import PrincipalDep, SessionDep, rate_limit
from app.api.routes.generate import STREAM_DOC, HandlerDep
from app.api.sse import sse_response
from app.schemas.common import ERROR_RESPONSES, RATE_LIMITED_DOC
from app.schemas.generate import ChatCompletion, ChatCompletionIn, ModelList
from app.services.generate import chat_completion, list_models, parse_model_id

router = APIRouter(prefix="/v1", tags=["openai"], responses=ERROR_RESPONSES)


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses={**STREAM_DOC, **RATE_LIMITED_DOC},
    summary="Chat completion (OpenAI-compatible)",
    dependencies=[Depends(rate_limit("generate"))],
)
async def chat_completions(
    principal: PrincipalDep, session: SessionDep, handler: HandlerDep, body: ChatCompletionIn
) -> Any:
    """OpenAI's chat completions with `model: "user:<id>"`; `stream: true` streams chunks."""
    user_id, selector = parse_model_id(body.model)
    principal.authorize_user(user_id)
    call = await run_in_threadpool(
        handler.prepare, session, user_id, selector, body.chat(), body, body.token_limit()
    )
    session.close()  # nothing was written: don't hold a connection through the generation
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        events = await handler.open_stream(call)
        return sse_response(call.served.model_id, events, include_usage=usage)
    return chat_completion(call, await handler.complete(call))


@router.get("/models", response_model=ModelList, summary="Models this key may use")
def models(principal: PrincipalDep, session: SessionDep) -> ModelList:
    """The caller's `user:<id>` ids (each version too); the operator sees every user."""
    return ModelList(data=list_models(session, principal))
