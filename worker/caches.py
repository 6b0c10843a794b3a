"""Database-backed caches for the engine: base responses and reference log-probs.

Both are properties of (base model, prompt, response), not of a user, so every later job of every
user reuses them. Each call is its own short transaction; concurrent writers of the same key are
fine (the first value stays: the same model computed both).

Whether a lookup hit says whether someone else already sent that prompt or answer, so it is never
reported per job; each lookup adds its hits and misses to the `cache_lookups` totals instead
(operators read them in /metrics).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import InstrumentedAttribute, Session, sessionmaker

from app.core.db import transaction
from app.models import (
    BASE_RESPONSE_CACHE,
    GATE_BASELINE_CACHE,
    REFERENCE_LOGPROB_CACHE,
    BaseResponse,
    CacheLookups,
    ReferenceLogprob,
    utcnow,
)

CHUNK = 500  # keys per IN (...) / rows per INSERT


class DbCache:
    """A KeyValueCache over a (cache_key, value) table."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        model: type[BaseResponse | ReferenceLogprob],
        value: InstrumentedAttribute[Any],
        name: str,
    ) -> None:
        self.factory = factory
        self.model = model
        self.value = value
        self.name = name

    def get_many(self, keys: list[str]) -> dict[str, Any]:
        """Values of the keys that are present (and the lookup counted in `cache_lookups`)."""
        found: dict[str, Any] = {}
        with transaction(self.factory) as session:
            for chunk in _chunks(keys):
                rows = session.execute(
                    select(self.model.cache_key, self.value).where(self.model.cache_key.in_(chunk))
                )
                found.update({key: value for key, value in rows})
            hits = len(set(keys) & found.keys())
            count_lookups(session, self.name, hits, len(set(keys)) - hits)
        return found

    def put_many(self, items: dict[str, Any]) -> None:
        """Store these items (keys already present keep their value)."""
        if not items:
            return
        now = utcnow()
        rows = [{"cache_key": k, self.value.key: v, "created_at": now} for k, v in items.items()]
        with transaction(self.factory) as session:
            dialect = session.get_bind().dialect.name
            insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
            for chunk in _chunks(rows):
                session.execute(insert(self.model).values(chunk).on_conflict_do_nothing())


def count_lookups(session: Session, cache: str, hits: int, misses: int) -> None:
    """Add one lookup's hits and misses to the cache's totals (an upsert: no row to seed)."""
    if not hits and not misses:
        return
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    statement = insert(CacheLookups).values(cache=cache, hits=hits, misses=misses)
    session.execute(
        statement.on_conflict_do_update(
            index_elements=[CacheLookups.cache],
            set_={
                "hits": CacheLookups.hits + statement.excluded.hits,
                "misses": CacheLookups.misses + statement.excluded.misses,
            },
        )
    )


def _chunks(items: list[Any]) -> Iterator[list[Any]]:
    for start in range(0, len(items), CHUNK):
        yield items[start : start + CHUNK]


def base_response_cache(factory: sessionmaker[Session]) -> DbCache:
    """Base responses keyed by (model identity, prompt)."""
    return DbCache(factory, BaseResponse, BaseResponse.response, BASE_RESPONSE_CACHE)


def reference_logprob_cache(factory: sessionmaker[Session]) -> DbCache:
    """Reference log-probs keyed by (model identity, prompt, response, truncation limits)."""
    return DbCache(factory, ReferenceLogprob, ReferenceLogprob.logprob, REFERENCE_LOGPROB_CACHE)


def gate_baseline_cache(factory: sessionmaker[Session]) -> DbCache:
    """The retention gate's base-model figures (keys prefixed `gate-`), in the base_responses
    table but counted under their own name, apart from training's base answers."""
    return DbCache(factory, BaseResponse, BaseResponse.response, GATE_BASELINE_CACHE)
