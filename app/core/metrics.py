"""Prometheus metrics. Each API process owns a registry; job figures are read from the database
at scrape time (the database is the source of truth, and workers run in other processes).

A second registry holds what only the operator may see: the shared caches' hit and miss totals
(whether a cache hit tells a user that someone else sent that prompt or answer). /metrics adds it
only for a request carrying the operator key, even where /metrics is open to anyone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The metric objects of one app instance."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.operator_registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "bapo_http_requests", "HTTP requests", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "bapo_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.pairs_stored = Counter(
            "bapo_feedback_pairs_stored", "Preference pairs stored", registry=r
        )
        self.adapter_loads = Counter(
            "bapo_adapter_loads",
            "Adapters loaded into the inference backend",
            ["backend"],
            registry=r,
        )
        self.adapter_load_seconds = Histogram(
            "bapo_adapter_load_seconds",
            "Adapter load latency",
            ["backend"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.generate_tokens_per_second = Histogram(
            "bapo_generate_tokens_per_second",
            "Output tokens per second of one generate request",
            ["backend"],
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "bapo_generate_time_to_first_token_seconds",
            "Time to the first streamed token",
            ["backend"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.generated_tokens = Counter(
            "bapo_generated_tokens", "Output tokens generated", ["backend"], registry=r
        )

    def watch_jobs(self, engine: Engine) -> None:
        """Export job counts by status and recent training speed, read from the database; and,
        to the operator only, the cache lookup totals."""
        self.registry.register(JobCollector(engine))
        self.operator_registry.register(CacheCollector(engine))

    def exposition(self, operator: bool) -> bytes:
        """The scrape body: every public metric, plus the operator-only ones for the operator."""
        body = generate_latest(self.registry)
        return body + generate_latest(self.operator_registry) if operator else body


class JobCollector(Collector):
    """Jobs by status, and duration / tokens-per-second of the latest succeeded jobs."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        from app.models import JOB_STATUSES, TrainingJob

        by_status = GaugeMetricFamily(
            "bapo_training_jobs", "Training jobs by status", labels=["status"]
        )
        duration = GaugeMetricFamily(
            "bapo_training_last_duration_seconds",
            "Wall time of the most recent succeeded training job",
        )
        speed = GaugeMetricFamily(
            "bapo_training_last_tokens_per_second",
            "Training tokens/s of the most recent succeeded training job",
        )
        try:
            with self.engine.connect() as conn:
                counts = dict(
                    conn.execute(
                        select(TrainingJob.status, func.count()).group_by(TrainingJob.status)
                    ).all()
                )
                last = conn.execute(
                    select(TrainingJob.started_at, TrainingJob.finished_at, TrainingJob.metrics)
                    .where(TrainingJob.status == "succeeded")
                    .order_by(TrainingJob.finished_at.desc())
                    .limit(1)
                ).first()
        except SQLAlchemyError:
            return  # the database being down is reported by /readyz, not by a broken scrape
        for status in JOB_STATUSES:
            by_status.add_metric([status], float(counts.get(status, 0)))
        yield by_status
        if last is not None:
            yield from _last_job_metrics(duration, speed, last)


class CacheCollector(Collector):
    """Hits and misses of the shared base-response / reference-log-prob caches, over all jobs."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        from app.models import CACHE_NAMES, CacheLookups

        lookups = CounterMetricFamily(
            "bapo_training_cache_lookups",
            "Entries training jobs looked up in the shared caches: hit = reused, miss = computed",
            labels=["cache", "result"],
        )
        try:
            with self.engine.connect() as conn:
                rows = {r.cache: r for r in conn.execute(select(CacheLookups)).all()}
        except SQLAlchemyError:
            return  # as for the jobs: /readyz reports the database
        for cache in CACHE_NAMES:
            row = rows.get(cache)
            lookups.add_metric([cache, "hit"], float(row.hits if row else 0))
            lookups.add_metric([cache, "miss"], float(row.misses if row else 0))
        yield lookups


def _last_job_metrics(
    duration: GaugeMetricFamily, speed: GaugeMetricFamily, row: Any
) -> Iterator[Metric]:
    started, finished, metrics = row
    if started is not None and finished is not None:
        duration.add_metric([], (finished - started).total_seconds())
        yield duration
    tokens_per_second = (metrics or {}).get("tokens_per_s")  # TrainResult.tokens_per_s
    if isinstance(tokens_per_second, int | float):
        speed.add_metric([], float(tokens_per_second))
        yield speed


class MetricsMiddleware:
    """Count requests and time them by route template (not raw path: ids would explode labels)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"]
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - start)
