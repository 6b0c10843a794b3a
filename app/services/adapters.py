"""Adapter versions: publish (for the training worker), list, activate, and choose one to serve.

Adapters are immutable: version N of a user is the folder `ADAPTER_DIR/<user>/v<N>` served under the
name `user-<id>-v<N>`, and a name is never reused for other weights: issuing a version raises the
user id's version floor, which no deletion lowers, and the next version is always above it.

The database stores each folder relative to the adapter store (`<user>/v<N>`), resolved against this
process's ADAPTER_DIR when used, so nodes may mount the store at different paths.

An explicit activation pins the user's choice: publishing then records new versions without
activating them, until the user activates the newest version or unpins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.errors import Conflict, InvalidRequest, NotFound
from app.inference.base import AdapterRef
from app.models import Adapter, AdapterVersionFloor
from app.services import users as user_service

ADAPTER_CONFIG = "adapter_config.json"
VERSION_RE = re.compile(r"v?([1-9][0-9]{0,8})")
ACTIVE = "active"
BASE = "base"


def adapter_name(user_id: str, version: int) -> str:
    """The immutable serving name of a version: `user-<id>-v<N>`."""
    return f"user-{user_id}-v{version}"


def adapter_folder(adapter_root: Path, user_id: str, version: int) -> Path:
    """Where version N of a user's adapter lives: ADAPTER_DIR/<user_id>/v<N>."""
    return adapter_root / user_id / f"v{version}"


def name_pattern(user_id: str) -> re.Pattern[str]:
    """Matches every serving name of this user's adapters (and no other user's)."""
    return re.compile(rf"user-{re.escape(user_id)}-v[0-9]+")


def parse_selector(text: str) -> str | int:
    """'active', 'base', or a version number from 'v3' / '3'; 422 otherwise."""
    if text in (ACTIVE, BASE):
        return text
    match = VERSION_RE.fullmatch(text)
    if match is None:
        raise InvalidRequest(
            f"adapter must be 'active', 'base' or like 'v3', not {text!r}",
            "invalid_adapter",
            param="adapter",
        )
    return int(match.group(1))


def stored_path(user_id: str, version: int) -> str:
    """How the database records a version's folder: relative to the store, `<user_id>/v<N>`."""
    return str(PurePosixPath(user_id, f"v{version}"))


def next_version(session: Session, user_id: str) -> int:
    """The user's next version number: above every version ever issued for this user id.

    Locks the user id's floor row (Postgres), so concurrent publishers wait for each other.
    """
    floor = session.get(AdapterVersionFloor, user_id, with_for_update=True)
    # Rows kept from before every issue raised the floor (migration 0004 backfills those too).
    latest = session.scalar(select(func.max(Adapter.version)).where(Adapter.user_id == user_id))
    return max(int(latest or 0), floor.last_version if floor else 0) + 1


def _raise_floor(session: Session, user_id: str, version: int) -> None:
    """Record `version` as issued: no later version of this user id is numbered at or below it."""
    floor = session.get(AdapterVersionFloor, user_id)
    if floor is None:
        session.add(AdapterVersionFloor(user_id=user_id, last_version=version))
    else:
        floor.last_version = max(floor.last_version, version)


def register_adapter(
    session: Session,
    user_id: str,
    path: Path,
    *,
    job_id: str | None,
    method: str,
    metrics: dict[str, Any] | None,
    gate_passed: bool,
    gate_reason: str | None,
) -> Adapter:
    """Record the folder `<store>/<user>/v<N>` as version N, the user's next version.

    It becomes active if it passed the gate and the user has not pinned their choice.
    """
    user = user_service.get_user(session, user_id)
    if not (path / ADAPTER_CONFIG).is_file():
        raise InvalidRequest(
            f"{path} is not a complete adapter folder (no {ADAPTER_CONFIG})", "adapter_incomplete"
        )
    version = next_version(session, user_id)
    relative = stored_path(user_id, version)
    if path.parts[-2:] != PurePosixPath(relative).parts:
        raise InvalidRequest(
            f"{path} is not the folder of v{version}: it must be <adapter store>/{relative}",
            "adapter_misplaced",
        )
    _raise_floor(session, user_id, version)
    adapter = Adapter(
        user_id=user_id,
        version=version,
        name=adapter_name(user_id, version),
        path=relative,
        job_id=job_id,
        method=method,
        metrics=metrics,
        gate_passed=gate_passed,
        gate_reason=gate_reason,
    )
    session.add(adapter)
    if gate_passed and not user.active_adapter_pinned:
        user.active_adapter_version = version
    session.flush()
    return adapter


def list_adapters(session: Session, user_id: str) -> list[Adapter]:
    """The user's adapters, newest version first."""
    user_service.get_user(session, user_id)
    query = select(Adapter).where(Adapter.user_id == user_id).order_by(Adapter.version.desc())
    return list(session.scalars(query))


@dataclass(frozen=True)
class ListedAdapter:
    """An adapter row as a listing shows it: plus whether it is active and its files present."""

    adapter: Adapter
    active: bool
    available: bool

    def __getattr__(self, name: str) -> Any:
        """Every other attribute is the row's."""
        if name.startswith("__") or name == "adapter":  # copy/pickle probes; no recursion
            raise AttributeError(name)
        return getattr(self.adapter, name)


@dataclass(frozen=True)
class AdapterListing:
    """A user's versions (newest first), the active one and whether the user pinned it."""

    data: list[ListedAdapter]
    active_version: int | None
    pinned: bool


def listing(session: Session, user_id: str, adapter_root: Path) -> AdapterListing:
    """The user's versions, each marked active or not and available (files present) or not."""
    rows = list_adapters(session, user_id)
    user = user_service.get_user(session, user_id)
    active = user.active_adapter_version
    data = [ListedAdapter(a, a.version == active, is_available(a, adapter_root)) for a in rows]
    return AdapterListing(data, active, user.active_adapter_pinned)


def get_adapter(session: Session, user_id: str, version: int) -> Adapter:
    """One version, or NotFound."""
    adapter = session.scalar(
        select(Adapter).where(Adapter.user_id == user_id, Adapter.version == version)
    )
    if adapter is None:
        raise NotFound(f"User {user_id!r} has no adapter v{version}", "adapter_not_found")
    return adapter


@dataclass(frozen=True)
class Activation:
    """The outcome of an activation: what is active now and what was before."""

    active: Adapter | None
    previous_name: str | None


def activate(session: Session, user_id: str, selector: str, adapter_root: Path) -> Activation:
    """Make a version (or 'base') the one served by default; refuses unknown or missing versions.

    The choice is pinned (publishing stops activating new versions) unless it is the user's
    newest version, which means "follow new versions" again.
    """
    user = user_service.get_user(session, user_id)
    previous = user.active_adapter_version
    target = parse_selector(selector)
    if target == ACTIVE:
        raise InvalidRequest(
            "give a version like 'v3', or 'base'", "invalid_adapter", param="version"
        )
    adapter = None if target == BASE else get_adapter(session, user_id, int(target))
    if adapter is not None:
        require_files(adapter, adapter_root)
    user.active_adapter_version = adapter.version if adapter else None
    user.active_adapter_pinned = adapter is None or adapter.version != _newest(session, user_id)
    session.flush()
    previous_name = adapter_name(user_id, previous) if previous is not None else None
    return Activation(adapter, previous_name)


def unpin(session: Session, user_id: str) -> None:
    """Clear the user's pin: the active adapter stays, the next version that passes replaces it."""
    user_service.get_user(session, user_id).active_adapter_pinned = False
    session.flush()


def _newest(session: Session, user_id: str) -> int | None:
    """The user's highest recorded version."""
    return session.scalar(select(func.max(Adapter.version)).where(Adapter.user_id == user_id))


def adapter_path(adapter: Adapter, adapter_root: Path) -> Path:
    """The version's folder on this node: its stored path under the adapter store.

    Rows written before paths were stored relative hold the writer's absolute folder: that one
    while it is complete, else the same version's folder under this node's store.
    """
    stored = Path(adapter.path)
    if not stored.is_absolute():
        return adapter_root.resolve() / stored  # absolute: vLLM resolves it in its own cwd
    if (stored / ADAPTER_CONFIG).is_file():
        return stored
    return adapter_folder(adapter_root.resolve(), adapter.user_id, adapter.version)


def require_files(adapter: Adapter, adapter_root: Path) -> None:
    """Conflict when the version's folder is gone: it cannot be served."""
    if not is_available(adapter, adapter_root):
        raise Conflict(
            f"Adapter v{adapter.version} has no files at {adapter_path(adapter, adapter_root)}",
            "adapter_files_missing",
        )


def is_available(adapter: Adapter, adapter_root: Path) -> bool:
    """True when the adapter's folder is complete on this node."""
    return (adapter_path(adapter, adapter_root) / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class ServedAdapter:
    """What a generate request will be served with (adapter None = the base model)."""

    user_id: str
    adapter: AdapterRef | None
    is_active: bool

    @property
    def version(self) -> int | None:
        """The adapter version, None for the base model."""
        return self.adapter.version if self.adapter else None

    @property
    def model_id(self) -> str:
        """The OpenAI-surface model id: `user:<id>:v<N>` or `user:<id>:base`."""
        return f"user:{self.user_id}:" + (f"v{self.version}" if self.adapter else BASE)


def resolve(session: Session, user_id: str, selector: str, adapter_root: Path) -> ServedAdapter:
    """The adapter to serve for 'active' (base if none), 'base' or a version; 404 if unknown."""
    user = user_service.get_user(session, user_id)
    target = parse_selector(selector)
    if target == ACTIVE:
        target = user.active_adapter_version or BASE
    if target == BASE:
        return ServedAdapter(user_id, None, user.active_adapter_version is None)
    adapter = get_adapter(session, user_id, int(target))
    require_files(adapter, adapter_root)
    ref = AdapterRef(adapter.name, adapter_path(adapter, adapter_root), adapter.version)
    return ServedAdapter(user_id, ref, adapter.version == user.active_adapter_version)
