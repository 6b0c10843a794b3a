"""Adapter versions: publish (for the training worker), list, activate, and choose one to serve.

Adapters are immutable: version N of a user is the folder `ADAPTER_DIR/<user>/v<N>` served under the
name `user-<id>-v<N>`, and a name is never reused for other weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
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


def next_version(session: Session, user_id: str) -> int:
    """The version number the user's next adapter gets (1 for the first)."""
    latest = session.scalar(select(func.max(Adapter.version)).where(Adapter.user_id == user_id))
    floor = session.get(AdapterVersionFloor, user_id)
    return max(int(latest or 0), floor.last_version if floor else 0) + 1


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
    """Record a complete adapter folder as the user's next version; active if the gate passed."""
    user = user_service.get_user(session, user_id)
    if not (path / ADAPTER_CONFIG).is_file():
        raise InvalidRequest(
            f"{path} is not a complete adapter folder (no {ADAPTER_CONFIG})", "adapter_incomplete"
        )
    version = next_version(session, user_id)
    adapter = Adapter(
        user_id=user_id,
        version=version,
        name=adapter_name(user_id, version),
        path=str(path.resolve()),
        job_id=job_id,
        method=method,
        metrics=metrics,
        gate_passed=gate_passed,
        gate_reason=gate_reason,
    )
    session.add(adapter)
    if gate_passed:
        user.active_adapter_version = version
    session.flush()
    return adapter


def list_adapters(session: Session, user_id: str) -> list[Adapter]:
    """The user's adapters, newest version first."""
    user_service.get_user(session, user_id)
    query = select(Adapter).where(Adapter.user_id == user_id).order_by(Adapter.version.desc())
    return list(session.scalars(query))


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


def activate(session: Session, user_id: str, selector: str) -> Activation:
    """Make a version (or 'base') the one served by default; refuses unknown or missing versions."""
    user = user_service.get_user(session, user_id)
    previous = user.active_adapter_version
    target = parse_selector(selector)
    if target == ACTIVE:
        raise InvalidRequest(
            "give a version like 'v3', or 'base'", "invalid_adapter", param="version"
        )
    adapter = None if target == BASE else get_adapter(session, user_id, int(target))
    if adapter is not None:
        require_files(adapter)
    user.active_adapter_version = adapter.version if adapter else None
    session.flush()
    previous_name = adapter_name(user_id, previous) if previous is not None else None
    return Activation(adapter, previous_name)


def require_files(adapter: Adapter) -> None:
    """Conflict when the version's folder is gone: it cannot be served."""
    if not is_available(adapter):
        raise Conflict(
            f"Adapter v{adapter.version} has no files at {adapter.path}", "adapter_files_missing"
        )


def is_available(adapter: Adapter) -> bool:
    """True when the adapter's folder is complete on this machine."""
    return (Path(adapter.path) / ADAPTER_CONFIG).is_file()


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


def resolve(session: Session, user_id: str, selector: str) -> ServedAdapter:
    """The adapter to serve for 'active' (base if none), 'base' or a version; 404 if unknown."""
    user = user_service.get_user(session, user_id)
    target = parse_selector(selector)
    if target == ACTIVE:
        target = user.active_adapter_version or BASE
    if target == BASE:
        return ServedAdapter(user_id, None, user.active_adapter_version is None)
    adapter = get_adapter(session, user_id, int(target))
    require_files(adapter)
    ref = AdapterRef(adapter.name, Path(adapter.path), adapter.version)
    return ServedAdapter(user_id, ref, adapter.version == user.active_adapter_version)
