"""OpenAI-compatible surface: chat and text completions, and the models a key may use.

The model id names the user (`user:<id>`, optionally `:v<N>` or `:base`); the key must own that
user (the operator key may use any). Errors here speak OpenAI's dialect (see app/core/errors.py).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.api.deps import PrincipalDep, SessionDep, rate_limit
from app.api.routes.generate import STREAM_DOC, HandlerDep
from app.api.sse import TextChunkWriter, sse_response
from app.api.state import StateDep
from app.core.security import Principal
from app.schemas.common import ERROR_RESPONSES, RATE_LIMITED_DOC
from app.schemas.generate import (
    ChatCompletion,
    ChatCompletionIn,
    CompletionIn,
    ModelCard,
    ModelList,
    OpenAIRequestIn,
    TextCompletion,
)
from app.services.generate import (
    GenerateCall,
    GenerateHandler,
    chat_completion,
    list_models,
    parse_model_id,
    retrieve_model,
    text_completion,
)

router = APIRouter(prefix="/v1", tags=["openai"], responses=ERROR_RESPONSES)
log = logging.getLogger(__name__)


async def _prepare(
    principal: Principal,
    session: Session,
    handler: GenerateHandler,
    body: OpenAIRequestIn,
    messages: list[dict[str, str]],
    max_tokens: int | None,
) -> GenerateCall:
    """Authorize the model's user, check the request, pick the adapter; release the session."""
    user_id, selector = parse_model_id(body.model)
    principal.authorize_user(user_id)
    if body.user:
        log.info("openai request for %s on behalf of end user %r", body.model, body.user)
    call = await run_in_threadpool(
        handler.prepare,
        session,
        user_id,
        selector,
        messages,
        body,
        max_tokens,
        options=body.engine_options(),
        stream=body.stream,
    )
    session.close()  # nothing was written: don't hold a connection through the generation
    return call


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
    call = await _prepare(principal, session, handler, body, body.chat(), body.token_limit())
    if body.stream:
        events = await handler.open_stream(call)
        return sse_response(call.served.model_id, events, include_usage=body.include_usage())
    return chat_completion(call, await handler.complete(call))


@router.post(
    "/completions",
    response_model=TextCompletion,
    responses={**STREAM_DOC, **RATE_LIMITED_DOC},
    summary="Text completion (OpenAI-compatible, legacy)",
    dependencies=[Depends(rate_limit("generate"))],
)
async def completions(
    principal: PrincipalDep, session: SessionDep, handler: HandlerDep, body: CompletionIn
) -> Any:
    """Continue `prompt` as raw text (no chat template) with the user's adapter."""
    call = await _prepare(principal, session, handler, body, [], body.max_tokens)
    if body.stream:
        events = await handler.open_stream(call)
        return sse_response(
            call.served.model_id,
            events,
            include_usage=body.include_usage(),
            writer=TextChunkWriter,
        )
    return text_completion(call, await handler.complete(call))


@router.get("/models", response_model=ModelList, summary="Models this key may use")
def models(principal: PrincipalDep, session: SessionDep, state: StateDep) -> ModelList:
    """The caller's `user:<id>` ids (each version too); the operator sees every user."""
    return ModelList(data=list_models(session, principal, state.settings.served_model_name))


@router.get("/models/{model_id}", response_model=ModelCard, summary="One model")
def model(
    model_id: str, principal: PrincipalDep, session: SessionDep, state: StateDep
) -> ModelCard:
    """`user:<id>` (root: the version it means now), `user:<id>:base` or `user:<id>:v<N>`."""
    return retrieve_model(session, principal, model_id, state.settings.served_model_name)
