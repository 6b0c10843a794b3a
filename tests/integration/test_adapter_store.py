"""The adapter store with its database: publishing, GC, and moving the store.

Publishing through the store never reuses a version, not after a GC nor after a crash between the
rename and the commit. The store can move: adapter paths are kept relative to ADAPTER_DIR, resolved
at use. A shared volume may be mounted at different paths on different nodes (or moved to a new
disk): here the store is copied from one folder to another, the original removed, and the app
started again on the same Postgres database with ADAPTER_DIR pointing at the copy.
(tests/unit/test_adapter_store.py tests the store's folders alone.)
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.api.state import app_state
from app.core.config import Settings
from app.core.db import make_engine, make_sessionmaker, transaction
from app.models import Adapter
from app.services import adapters as adapter_service
from app.services import operations
from app.services import users as user_service
from foundation.adapter_store import ADAPTER_CONFIG, AdapterStore, unlink_name
from foundation.files import atomic_folder
from tests.integration.generation_support import (
    build_adapters,
    generated,
    model_dir,
    one_torch_thread,
    publish,
)
from tests.support import Api, LiveServer, make_settings, postgres_database


@pytest.fixture
def database() -> Iterator[str]:
    """A fresh migrated Postgres database shared by both "nodes" of a test."""
    with postgres_database() as url:
        yield url


@contextmanager
def node(settings: Settings) -> Iterator[tuple[LiveServer, Api]]:
    """The app running with these settings, and a client of it."""
    server = LiveServer(settings).start()
    api = Api(server.url)
    try:
        yield server, api
    finally:
        api.close()
        server.stop()


def move_store(source: Path, target: Path) -> None:
    """Copy the whole store to its new place and remove the old one (nothing may point there)."""
    shutil.copytree(source, target)
    shutil.rmtree(source)


class SimulatedCrash(RuntimeError):
    """Raised inside a publishing transaction: the process "dies" before the commit."""


def publish_staged(
    factory: sessionmaker[Session], store: AdapterStore, user_id: str, weights: bytes
) -> int:
    """What the worker does: write a staging folder whole, then publish it in one transaction."""
    staging = store.staging_folder(user_id, f"job_{weights.hex()}", 1)
    with atomic_folder(staging) as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(weights)
        (tmp / ADAPTER_CONFIG).write_text("{}")
    with transaction(factory) as session:
        adapter = adapter_service.publish_adapter(
            session,
            store,
            user_id,
            staging,
            job_id=None,
            method="bapo",
            metrics=None,
            gate_passed=True,
            gate_reason=None,
        )
        return adapter.version


def weights_of(store: AdapterStore, user_id: str) -> dict[str, bytes]:
    """Each version folder of the user and the weights it holds."""
    return {
        p.name: (p / "adapter_model.safetensors").read_bytes()
        for p in sorted(store.user_folder(user_id).glob("v*"))
    }


def test_published_versions_are_never_reused_after_gc_or_a_crash(
    database: str, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path, database)
    store, engine = settings.adapter_store, make_engine(settings)
    factory = make_sessionmaker(engine)
    with transaction(factory) as session:
        user_service.create_user(session, "gc")
    assert [publish_staged(factory, store, "gc", bytes([n])) for n in (1, 2, 3, 4)] == [1, 2, 3, 4]
    with transaction(factory) as session:
        adapter_service.activate(session, "gc", "v2", store)
    with transaction(factory) as session:
        assert operations.collect_adapters(session, store, dry_run=False) == {"gc": [3, 4]}
    assert publish_staged(factory, store, "gc", b"\x05") == 5
    with pytest.raises(SimulatedCrash), transaction(factory) as session:
        staging = store.staging_folder("gc", "job_crash", 1)
        with atomic_folder(staging) as tmp:
            (tmp / ADAPTER_CONFIG).write_text("{}")
            (tmp / "adapter_model.safetensors").write_bytes(b"unrecorded")
        adapter_service.publish_adapter(
            session, store, "gc", staging, job_id=None, method="bapo", metrics=None,
            gate_passed=True, gate_reason=None,
        )  # fmt: skip
        raise SimulatedCrash
    assert weights_of(store, "gc")["v6"] == b"unrecorded"  # renamed, never recorded nor listed
    assert publish_staged(factory, store, "gc", b"\x06") == 6
    assert weights_of(store, "gc") == {"v1": b"\x01", "v2": b"\x02", "v5": b"\x05", "v6": b"\x06"}
    assert [e.name for e in store.user_folder("gc").iterdir() if e.name.startswith(".")] == []
    engine.dispose()


def only_row(listing: dict[str, Any]) -> dict[str, Any]:
    """The one adapter of a listing."""
    rows = listing["data"]
    assert len(rows) == 1, rows
    row: dict[str, Any] = rows[0]
    return row


@pytest.mark.slow
def test_a_moved_store_still_lists_and_serves_its_adapters(database: str, tmp_path: Path) -> None:
    folder = build_adapters(tmp_path / "built", [2])[2]
    old_root, new_root = tmp_path / "node-a" / "adapters", tmp_path / "node-b" / "mnt" / "store"
    common: dict[str, Any] = {
        "base_model": str(model_dir()),
        "inference_backend": "local",
        "local_threads": 1,
    }
    with one_torch_thread():
        with node(make_settings(tmp_path / "a", database, adapter_dir=old_root, **common)) as (
            server,
            api,
        ):
            user_id, headers = api.create_user("mover")
            assert publish(server, user_id, folder) == 1
            with transaction(app_state(server.app).session_factory) as session:
                stored = session.scalars(select(Adapter.path)).one()
            assert stored == "mover/v1", "stored relative to the adapter store root"
            before = generated(api, user_id, headers)
            base = generated(api, user_id, headers, adapter="base")["text"]
        move_store(old_root, new_root)
        with node(make_settings(tmp_path / "b", database, adapter_dir=new_root, **common)) as (
            _,
            api,
        ):
            listing = api.http.get(f"/users/{user_id}/adapters", headers=headers).json()
            row = only_row(listing)
            assert (row["available"], row["active"]) == (True, True), listing
            after = generated(api, user_id, headers)
    assert (after["adapter_version"], after["text"]) == (1, before["text"])
    assert after["text"] != base, "served with the adapter, not the base model"


def test_rows_with_absolute_paths_from_older_releases_follow_the_store(
    database: str, tmp_path: Path
) -> None:
    old_root, new_root = tmp_path / "node-a" / "adapters", tmp_path / "node-b" / "store"
    with node(make_settings(tmp_path / "a", database, adapter_dir=old_root)) as (server, api):
        user_id, headers = api.create_user("legacy")
        with transaction(app_state(server.app).session_factory) as session:
            folder = AdapterStore(old_root).version_folder(user_id, 1)
            folder.mkdir(parents=True)
            (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
            adapter_service.register_adapter(
                session,
                user_id,
                folder,
                job_id=None,
                method="bapo",
                metrics=None,
                gate_passed=True,
                gate_reason=None,
            )
            # What releases before relative paths stored: the absolute folder on the writer.
            session.execute(update(Adapter).values(path=str(folder.resolve())))
    move_store(old_root, new_root)
    with node(make_settings(tmp_path / "b", database, adapter_dir=new_root)) as (_, api):
        listing = api.http.get(f"/users/{user_id}/adapters", headers=headers).json()
        assert only_row(listing)["available"] is True, listing
        response = api.http.post(f"/users/{user_id}/adapters/v1/activate", headers=headers)
        assert response.status_code == 200, response.text


def test_versions_are_linked_by_name_for_vllms_resolver(database: str, tmp_path: Path) -> None:
    """`<store>/@by-name/<name>/` leads to each live version's files (what vLLM's filesystem
    resolver reads); GC and user deletion remove them; link-adapters restores lost ones."""
    settings = make_settings(tmp_path, database)
    store, engine = settings.adapter_store, make_engine(settings)
    factory = make_sessionmaker(engine)

    def links() -> dict[str, bytes]:
        return {
            link.name: (link / "adapter_model.safetensors").read_bytes()
            for link in sorted(store.names_folder.iterdir())
            if link.exists()
        }

    with transaction(factory) as session:
        user_service.create_user(session, "ln")
        user_service.create_user(session, "ln-v1")  # a user whose id looks like a version name
    for weights in (b"\x01", b"\x02", b"\x03"):
        publish_staged(factory, store, "ln", weights)
    publish_staged(factory, store, "ln-v1", b"\x09")
    assert links() == {
        "user-ln-v1": b"\x01",
        "user-ln-v2": b"\x02",
        "user-ln-v3": b"\x03",
        "user-ln-v1-v1": b"\x09",
    }
    named = store.names_folder / "user-ln-v3"
    weights = named / "adapter_model.safetensors"
    assert weights.readlink() == Path("../../ln/v3/adapter_model.safetensors")  # relative
    config = json.loads((named / ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == store.resolver_base  # what vLLM's --model names
    assert json.loads((store.version_folder("ln", 3) / ADAPTER_CONFIG).read_text()) == {}

    with transaction(factory) as session:
        assert operations.collect_adapters(session, store, dry_run=False) == {"ln": [1]}
    assert set(links()) == {"user-ln-v2", "user-ln-v3", "user-ln-v1-v1"}
    unlink_name(store.root, "user-ln-v3")  # e.g. published before the store kept links
    with transaction(factory) as session:
        assert operations.link_adapters(session, store) == (3, [])
    assert set(links()) == {"user-ln-v2", "user-ln-v3", "user-ln-v1-v1"}
    with transaction(factory) as session:
        user_service.delete_user(session, "ln", store)
    assert set(p.name for p in store.names_folder.iterdir()) == {"user-ln-v1-v1"}
    engine.dispose()
