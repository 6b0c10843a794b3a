"""Prometheus scrape endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.api.deps import MetricsAccessDep, is_operator_request
from app.api.state import StateDep
from app.schemas.common import ERROR_RESPONSES

router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    dependencies=[MetricsAccessDep],
    responses={status: ERROR_RESPONSES[status] for status in (401, 403, 503)},
)
def metrics(request: Request, state: StateDep) -> Response:
    """Request counts/latency by route, pairs stored, jobs by status, training/generate speed.

    With METRICS_REQUIRE_OPERATOR_KEY (the default) only the operator key may scrape. The shared
    caches' hit/miss totals are in the body only for the operator key, even when /metrics is open.
    """
    body = state.metrics.exposition(is_operator_request(request))
    return Response(body, media_type=CONTENT_TYPE_LATEST)
