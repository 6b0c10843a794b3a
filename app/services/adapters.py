"""Adapter versions: publish (for the training worker), list, activate, and choose one to serve.

Adapters are immutable: version N of a user is the folder `ADAPTER_DIR/<user>/v<N>` served under the
name `user-<id>-v<N>`, and a name is never reused for other weights (app.services.adapter_versions).
Where folders live and how one is published whole is the adapter store's (foundation.adapter_store);
the database records each folder relative to the store, so nodes may mount it at different paths.

An explicit activation pins the user's choice: publishing then records new versions without
activating them, until the user activates the newest version or unpins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, Unpack

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.errors import Conflict, InvalidRequest, NotFound
from app.inference.base import AdapterRef
from app.models import Adapter
from app.services import users as user_service
from app.services.adapter_versions import newest_version, next_version, raise_floor
from foundation.adapter_store import (
    ADAPTER_CONFIG,
    AdapterStore,
    is_complete,
    is_version_folder,
    link_name,
    relative_path,
)

VERSION_RE = re.compile(r"v?([1-9][0-9]{0,8})")
ACTIVE = "active"
BASE = "base"


def adapter_name(user_id: str, version: int) -> str:
    """The immutable serving name of a version: `user-<id>-v<N>`."""
    return f"user-{user_id}-v{version}"


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
    resolver_base: str | None = None,
) -> Adapter:
    """Record the folder `<store>/<user>/v<N>` as version N, the user's next version.

    It becomes active if it passed the gate and the user has not pinned their choice. It is also
    offered to vLLM's LoRA resolver under its name, for base model `resolver_base` (store doc).
    """
    user = user_service.get_user(session, user_id)
    if not is_complete(path):
        raise InvalidRequest(
            f"{path} is not a complete adapter folder (no {ADAPTER_CONFIG})", "adapter_incomplete"
        )
    version = next_version(session, user_id)
    relative = relative_path(user_id, version)
    if not is_version_folder(path, user_id, version):
        raise InvalidRequest(
            f"{path} is not the folder of v{version}: it must be <adapter store>/{relative}",
            "adapter_misplaced",
        )
    raise_floor(session, user_id, version)
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
    # Reachable by name for vLLM's resolver; a rollback leaves a link to a number never reused.
    link_name(path, adapter.name, resolver_base)
    return adapter


class AdapterRecord(TypedDict):
    """What register_adapter records about a version besides its folder."""

    job_id: str | None
    method: str
    metrics: dict[str, Any] | None
    gate_passed: bool
    gate_reason: str | None


def publish_adapter(
    session: Session,
    store: AdapterStore,
    user_id: str,
    staging: Path,
    **record: Unpack[AdapterRecord],
) -> Adapter:
    """Rename a complete staging folder to the user's next version, then record that version."""
    folder = store.publish(staging, user_id, next_version(session, user_id))
    return register_adapter(session, user_id, folder, **record, resolver_base=store.resolver_base)


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


def listing(session: Session, user_id: str, store: AdapterStore) -> AdapterListing:
    """The user's versions, each marked active or not and available (files present) or not."""
    rows = list_adapters(session, user_id)
    user = user_service.get_user(session, user_id)
    active = user.active_adapter_version
    data = [ListedAdapter(a, a.version == active, is_available(a, store)) for a in rows]
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


def activate(session: Session, user_id: str, selector: str, store: AdapterStore) -> Activation:
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
        require_files(adapter, store)
    user.active_adapter_version = adapter.version if adapter else None
    user.active_adapter_pinned = adapter is None or adapter.version != newest_version(
        session, user_id
    )
    session.flush()
    previous_name = adapter_name(user_id, previous) if previous is not None else None
    return Activation(adapter, previous_name)


def unpin(session: Session, user_id: str) -> None:
    """Clear the user's pin: the active adapter stays, the next version that passes replaces it."""
    user_service.get_user(session, user_id).active_adapter_pinned = False
    session.flush()


def adapter_path(adapter: Adapter, store: AdapterStore) -> Path:
    """The version's folder on this node (foundation.adapter_store: AdapterStore.locate)."""
    return store.locate(adapter.path, adapter.user_id, adapter.version)


def require_files(adapter: Adapter, store: AdapterStore) -> None:
    """Conflict when the version's folder is gone: it cannot be served."""
    if not is_available(adapter, store):
        raise Conflict(
            f"Adapter v{adapter.version} has no files at {adapter_path(adapter, store)}",
            "adapter_files_missing",
        )


def is_available(adapter: Adapter, store: AdapterStore) -> bool:
    """True when the adapter's folder is complete on this node."""
    return is_complete(adapter_path(adapter, store))


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


def resolve(session: Session, user_id: str, selector: str, store: AdapterStore) -> ServedAdapter:
    """The adapter to serve for 'active' (base if none), 'base' or a version; 404 if unknown."""
    user = user_service.get_user(session, user_id)
    target = parse_selector(selector)
    if target == ACTIVE:
        target = user.active_adapter_version or BASE
    if target == BASE:
        return ServedAdapter(user_id, None, user.active_adapter_version is None)
    adapter = get_adapter(session, user_id, int(target))
    require_files(adapter, store)
    ref = AdapterRef(adapter.name, adapter_path(adapter, store), adapter.version)
    return ServedAdapter(user_id, ref, adapter.version == user.active_adapter_version)
