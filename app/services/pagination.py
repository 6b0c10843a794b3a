"""Keyset pagination: one page of rows, whether more follow, and the cursor of the next page."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import Session

T = TypeVar("T")
U = TypeVar("U")


@dataclass(frozen=True)
class RowPage(Generic[T]):
    """A page of rows as list endpoints return it (`Page.model_validate(row_page)`)."""

    data: list[T]
    has_more: bool
    next_cursor: str | None

    def map(self, convert: Callable[[T], U]) -> RowPage[U]:
        """The same page with each row converted."""
        return RowPage([convert(row) for row in self.data], self.has_more, self.next_cursor)


def paginate(
    session: Session, query: Select[Any], limit: int, cursor_of: Callable[[Any], str]
) -> RowPage[Any]:
    """One page of `query` (ordered, past the cursor): `limit` rows, and one more to peek."""
    rows = list(session.scalars(query.limit(limit + 1)))
    page = rows[:limit]
    has_more = len(rows) > limit
    return RowPage(page, has_more, cursor_of(page[-1]) if has_more else None)
