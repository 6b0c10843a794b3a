"""The operator commands of `bapo`, run as a real process against Postgres and Redis."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, delete, select
from sqlalchemy.orm import Session

from app.models import Adapter, PreferencePair, TrainingJob
from app.services import adapters as adapter_service
from foundation.adapter_store import AdapterStore
from tests.worker_support import operator_env
from tests.worker_support import run_bapo as bapo


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Service settings for the CLI: a fresh migrated Postgres database, the test Redis."""
    with operator_env(tmp_path, RETRAIN_MIN_NEW_PAIRS="3") as settings:
        yield settings


def add_pairs(env: dict[str, str], user_id: str, count: int) -> None:
    engine = create_engine(env["DATABASE_URL"])
    with Session(engine) as session, session.begin():
        for i in range(count):
            session.add(
                PreferencePair(
                    user_id=user_id,
                    messages=[{"role": "user", "content": f"q{i}"}],
                    prompt_hash=f"h{i}",
                    chosen=f"good {i}",
                    rejected=f"bad {i}",
                )
            )
    engine.dispose()


def test_create_list_export_import(env: dict[str, str], tmp_path: Path) -> None:
    created = bapo(env, "create-user", "--id", "carol")
    assert created["id"] == "carol" and created["api_key"].startswith("bapo_")
    assert bapo(env, "create-user", "--id", "carol", ok=False).returncode == 1
    add_pairs(env, "carol", 3)
    listed = bapo(env, "list-users", "--json")
    assert listed == [{"id": "carol", "pair_count": 3, "versions": [], "active_version": None}]
    assert "carol" in bapo(env, "list-users")
    out = tmp_path / "carol.json"
    assert bapo(env, "export-user", "--id", "carol", "--out", str(out))["pairs"] == 3
    document = json.loads(out.read_text())
    assert [p["chosen"] for p in document["pairs"]] == ["good 0", "good 1", "good 2"]
    imported = bapo(env, "import-user", "--file", str(out), "--id", "carol2")
    assert imported["pairs"] == 3 and imported["api_key"] != created["api_key"]
    assert bapo(env, "import-user", "--file", str(out), ok=False).returncode == 1  # carol exists
    assert bapo(env, "export-user", "--id", "nobody", "--out", str(out), ok=False).returncode == 1
    (tmp_path / "junk.json").write_text("{not json")
    assert bapo(env, "import-user", "--file", str(tmp_path / "junk.json"), ok=False).returncode == 2


def test_retrain_due_enqueues_exactly_the_due_users(env: dict[str, str]) -> None:
    for user_id, pairs in (("due", 5), ("not-due", 1)):
        bapo(env, "create-user", "--id", user_id)
        add_pairs(env, user_id, pairs)
    job_ids = bapo(env, "retrain-due")["enqueued"]
    assert len(job_ids) == 1
    engine = create_engine(env["DATABASE_URL"])
    with Session(engine) as session:
        job = session.scalars(select(TrainingJob)).one()
    engine.dispose()
    assert (job.id, job.user_id, job.trigger, job.status) == (
        job_ids[0],
        "due",
        "schedule",
        "queued",
    )
    assert redis.Redis.from_url(env["BROKER_URL"]).llen("gpu") == 1
    assert bapo(env, "retrain-due")["enqueued"] == []  # one active job per user


def test_gc_keeps_the_active_and_the_previous_version(env: dict[str, str], tmp_path: Path) -> None:
    bapo(env, "create-user", "--id", "dave")
    engine = create_engine(env["DATABASE_URL"])
    folders = {}
    with Session(engine) as session, session.begin():
        for version in range(1, 6):
            folder = AdapterStore(tmp_path / "adapters").version_folder("dave", version)
            folder.mkdir(parents=True)
            (folder / "adapter_config.json").write_text("{}")
            folders[version] = folder
            adapter_service.register_adapter(
                session,
                "dave",
                folder,
                job_id=None,
                method="bapo",
                metrics={},
                gate_passed=version != 5,
                gate_reason=None,
            )
        adapter_service.activate(session, "dave", "v3", AdapterStore(tmp_path / "adapters"))
    engine.dispose()
    dry = bapo(env, "gc-adapters", "--dry-run")
    assert dry["collected"] == {"dave": ["v1", "v4", "v5"]} and folders[1].exists()
    assert bapo(env, "gc-adapters")["collected"] == {"dave": ["v1", "v4", "v5"]}
    assert bapo(env, "list-users", "--json")[0]["versions"] == [2, 3]
    assert [v for v, f in folders.items() if f.exists()] == [2, 3]
    assert bapo(env, "gc-adapters")["collected"] == {}


def register_next(session: Session, root: Path, user_id: str) -> int:
    """Write a config-only folder for the user's next version and register it (as the worker)."""
    version = adapter_service.next_version(session, user_id)
    folder = AdapterStore(root).version_folder(user_id, version)
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    adapter = adapter_service.register_adapter(
        session,
        user_id,
        folder,
        job_id=None,
        method="bapo",
        metrics={},
        gate_passed=True,
        gate_reason=None,
    )
    return adapter.version


def test_version_numbers_never_come_back_after_gc_or_any_deletion(
    env: dict[str, str], tmp_path: Path
) -> None:
    """GC removes v3 and v4 (newer than the active v2): the next version is v5, never v3 again.

    An inference server may still hold `user-<id>-v3`; a new v3 would be served its old weights.
    """
    bapo(env, "create-user", "--id", "erin")
    root = tmp_path / "adapters"
    engine = create_engine(env["DATABASE_URL"])
    with Session(engine) as session, session.begin():
        assert [register_next(session, root, "erin") for _ in range(4)] == [1, 2, 3, 4]
        adapter_service.activate(session, "erin", "v2", AdapterStore(root))
    assert bapo(env, "gc-adapters")["collected"] == {"erin": ["v3", "v4"]}
    with Session(engine) as session, session.begin():
        assert register_next(session, root, "erin") == 5
        # Any other deletion of adapter rows (here raw SQL) cannot lower the next version either.
        session.execute(delete(Adapter).where(Adapter.user_id == "erin"))
    with Session(engine) as session, session.begin():
        assert adapter_service.next_version(session, "erin") == 6
    engine.dispose()
