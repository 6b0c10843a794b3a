"""Operator tasks behind the `bapo` CLI: users, due retrains, adapter GC, export and import."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.core.db import after_commit
from app.core.errors import Conflict, InvalidRequest
from app.models import Adapter, PreferencePair, User
from app.services import adapters as adapter_service
from app.services import feedback as feedback_service
from app.services import users as user_service
from foundation.adapter_store import AdapterStore, is_complete, link_name, remove, unlink_name
from foundation.pairs import PairError, PairLimits, pair_from_dict

EXPORT_FORMAT = "bapo-user-export"
EXPORT_VERSION = 1


@dataclass(frozen=True)
class UserRow:
    id: str
    pair_count: int
    versions: list[int]
    active_version: int | None


def list_users(session: Session) -> list[UserRow]:
    """Every user with their pair count and adapter versions."""
    counts = dict(
        session.execute(
            select(PreferencePair.user_id, func.count()).group_by(PreferencePair.user_id)
        ).all()
    )
    versions: dict[str, list[int]] = {}
    for user_id, version in session.execute(
        select(Adapter.user_id, Adapter.version).order_by(Adapter.version)
    ):
        versions.setdefault(user_id, []).append(version)
    return [
        UserRow(u.id, int(counts.get(u.id, 0)), versions.get(u.id, []), u.active_adapter_version)
        for u in session.scalars(select(User).order_by(User.id))
    ]


def versions_to_collect(versions: list[int], active: int | None) -> list[int]:
    """Versions no longer needed: all but the active one and the one before it.

    Without an active adapter the two newest are kept (one may be activated again).
    """
    ordered = sorted(versions)
    if active is None or active not in ordered:
        return ordered[:-2]
    older = [v for v in ordered if v < active]
    keep = {active, *older[-1:]}
    return [v for v in ordered if v not in keep]


def collect_adapters(
    session: Session, store: AdapterStore, *, dry_run: bool
) -> dict[str, list[int]]:
    """Delete unneeded adapter versions (rows now, folders after commit); what was collected."""
    collected: dict[str, list[int]] = {}
    for row in list_users(session):
        doomed = versions_to_collect(row.versions, row.active_version)
        if not doomed:
            continue
        collected[row.id] = doomed
        if dry_run:
            continue
        adapters = list(
            session.scalars(
                select(Adapter).where(Adapter.user_id == row.id, Adapter.version.in_(doomed))
            )
        )
        for adapter in adapters:
            folder = adapter_service.adapter_path(adapter, store)
            after_commit(session, partial(unlink_name, store.root, adapter.name))
            after_commit(session, partial(remove, folder))
        session.execute(
            delete(Adapter).where(Adapter.user_id == row.id, Adapter.version.in_(doomed))
        )
    return collected


def link_adapters(session: Session, store: AdapterStore) -> tuple[int, list[str]]:
    """Link every recorded version whose files exist by its serving name (idempotent).

    For versions published before the store kept name links: vLLM's resolver finds them then.
    Returns (linked, names whose folder is missing).
    """
    linked, missing = 0, []
    for adapter in session.scalars(select(Adapter).order_by(Adapter.user_id, Adapter.version)):
        folder = adapter_service.adapter_path(adapter, store)
        if not is_complete(folder):
            missing.append(adapter.name)
            continue
        version = store.version_folder(adapter.user_id, adapter.version)
        link_name(version, adapter.name, store.resolver_base)
        linked += 1
    return linked, missing


def export_user(session: Session, user_id: str) -> dict[str, Any]:
    """A JSON-ready document with the user, their pairs and their adapter records."""
    user = user_service.get_user(session, user_id)
    pairs = session.scalars(
        select(PreferencePair).where(PreferencePair.user_id == user_id).order_by(PreferencePair.id)
    )
    adapters = session.scalars(
        select(Adapter).where(Adapter.user_id == user_id).order_by(Adapter.version)
    )
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "user": {
            "id": user.id,
            "created_at": user.created_at.isoformat(),
            "active_adapter_version": user.active_adapter_version,
        },
        "pairs": [
            {
                "messages": p.messages,
                "chosen": p.chosen,
                "rejected": p.rejected,
                "metadata": p.meta,
                "created_at": p.created_at.isoformat(),
            }
            for p in pairs
        ],
        "adapters": [
            {
                "version": a.version,
                "name": a.name,
                "method": a.method,
                "path": a.path,
                "metrics": a.metrics,
                "gate_passed": a.gate_passed,
                "gate_reason": a.gate_reason,
                "created_at": a.created_at.isoformat(),
            }
            for a in adapters
        ],
    }


def import_user(
    session: Session, document: dict[str, Any], user_id: str | None, limits: PairLimits
) -> tuple[str, str, int]:
    """Create a user from an export (pairs only; adapters are retrained): (id, new key, pairs).

    Each pair is checked like `POST /users/<id>/feedback` checks it; one bad pair refuses the
    whole import (the transaction creates nothing).
    """
    if document.get("format") != EXPORT_FORMAT or document.get("version") != EXPORT_VERSION:
        raise InvalidRequest(f"not a {EXPORT_FORMAT} v{EXPORT_VERSION} document", "bad_export")
    target = user_id or str(document.get("user", {}).get("id", ""))
    if session.get(User, target) is not None:
        raise Conflict(f"User {target!r} already exists; import under another id", "user_exists")
    user, key = user_service.create_user(session, target)
    items = document.get("pairs", [])
    if not isinstance(items, list):
        raise InvalidRequest("pairs: must be a list", "bad_export", param="pairs")
    rows = [_pair_row(user.id, item, i, limits) for i, item in enumerate(items)]
    session.add_all(rows)
    session.flush()
    return user.id, key, len(rows)


def _pair_row(user_id: str, item: Any, index: int, limits: PairLimits) -> PreferencePair:
    """The row of one exported pair, checked by the one pair validator."""
    where = f"pairs.{index}."
    try:
        row = feedback_service.pair_row(user_id, pair_from_dict(item, limits, where))
    except PairError as exc:
        raise InvalidRequest(str(exc), exc.code, param=exc.field) from exc
    try:
        if item.get("created_at"):
            row.created_at = datetime.fromisoformat(item["created_at"])
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"{where}created_at: {exc}", "bad_export") from exc
    return row
