"""Database-backed caches for the engine: base responses and reference log-probs.

Both are properties of (base model, prompt, response), not of a user, so every later job of every
user reuses them. Each call is its own short transaction; concurrent writers of the same key are
fine (the first value stays: the same model computed both).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import InstrumentedAttribute, Session, sessionmaker

from app.core.db import transaction
from app.models import BaseResponse, ReferenceLogprob, utcnow

CHUNK = 500  # keys per IN (...) / rows per INSERT


class DbCache:
    """A KeyValueCache over a (cache_key, value) table."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        model: type[BaseResponse | ReferenceLogprob],
        value: InstrumentedAttribute[Any],
    ) -> None:
        self.factory = factory
        self.model = model
        self.value = value

    def get_many(self, keys: list[str]) -> dict[str, Any]:
        """Values of the keys that are present."""
        found: dict[str, Any] = {}
        with transaction(self.factory) as session:
            for chunk in _chunks(keys):
                rows = session.execute(
                    select(self.model.cache_key, self.value).where(self.model.cache_key.in_(chunk))
                )
                found.update({key: value for key, value in rows})
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


def _chunks(items: list[Any]) -> Iterator[list[Any]]:
    for start in range(0, len(items), CHUNK):
        yield items[start : start + CHUNK]


def base_response_cache(factory: sessionmaker[Session]) -> DbCache:
    """Base responses keyed by (model identity, prompt)."""
    return DbCache(factory, BaseResponse, BaseResponse.response)


def reference_logprob_cache(factory: sessionmaker[Session]) -> DbCache:
    """Reference log-probs keyed by (model identity, prompt, response, truncation limits)."""
    return DbCache(factory, ReferenceLogprob, ReferenceLogprob.logprob)
