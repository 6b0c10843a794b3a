"""The adapter store on a real folder: layout, atomic publish, cleanup, relative paths.

A writer killed mid-write is a forked child that leaves with `os._exit` (no `finally`, no cleanup),
as a SIGKILL would. Version numbering (never reused, not after a GC) is the database's:
tests/integration/test_adapter_store.py and test_operator_cli.py test it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from foundation.adapter_store import (
    ADAPTER_CONFIG,
    AdapterStore,
    IncompleteAdapterError,
    is_version_folder,
    relative_path,
)
from foundation.files import atomic_folder, temp_siblings


def write_adapter(folder: Path, weights: bytes) -> None:
    """A complete (config + weights) adapter, written as the engine writes one: whole."""
    with atomic_folder(folder) as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(weights)
        (tmp / ADAPTER_CONFIG).write_text("{}")


def entries(store: AdapterStore, user_id: str) -> list[str]:
    """Everything in the user's folder (hidden entries included)."""
    return sorted(p.name for p in store.user_folder(user_id).iterdir())


def killed_while_writing(folder: Path) -> None:
    """A child process starts writing `folder` and dies halfway (no cleanup runs)."""
    pid = os.fork()
    if pid == 0:
        try:
            with atomic_folder(folder) as tmp:
                (tmp / "adapter_model.safetensors").write_bytes(b"half")
                os._exit(9)
        finally:
            os._exit(1)  # only if the write raised: never go back into pytest in the child
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 9


def test_layout_and_the_paths_the_database_records(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "store")
    assert store.version_folder("ann", 3) == tmp_path / "store" / "ann" / "v3"
    staging = store.staging_folder("ann", "job_1", 2)
    assert staging.parent == store.user_folder("ann") and staging.name.startswith(".")
    assert relative_path("ann", 3) == "ann/v3"
    assert is_version_folder(Path("/elsewhere/ann/v3"), "ann", 3)
    assert not is_version_folder(staging, "ann", 3)
    assert not is_version_folder(store.version_folder("ann", 3), "ann", 4)


def test_publish_renames_a_complete_staging_folder_into_its_version(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    staging = store.staging_folder("ann", "job_1", 1)
    write_adapter(staging, b"weights")
    final = store.publish(staging, "ann", 1)
    assert final == store.version_folder("ann", 1)
    assert (final / "adapter_model.safetensors").read_bytes() == b"weights"
    assert entries(store, "ann") == ["v1"]
    assert final.stat().st_mode & 0o005 == 0o005  # readable by a vLLM server of another user


def test_a_writer_killed_mid_write_leaves_no_version_and_cleanup_removes_its_trace(
    tmp_path: Path,
) -> None:
    store = AdapterStore(tmp_path)
    staging = store.staging_folder("bob", "job_2", 1)
    killed_while_writing(staging)
    assert not staging.exists()
    assert [p.name.startswith(".") for p in store.user_folder("bob").iterdir()] == [True]
    assert len(temp_siblings(staging)) == 1
    with pytest.raises(IncompleteAdapterError):
        store.publish(staging, "bob", 1)
    store.remove_staging(staging)
    assert entries(store, "bob") == []


def test_a_failed_write_cleans_up_after_itself(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    staging = store.staging_folder("cy", "job_3", 1)
    with pytest.raises(OSError, match="disk full"), atomic_folder(staging) as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError("disk full")
    assert entries(store, "cy") == []


def test_an_incomplete_staging_folder_is_never_published(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    staging = store.staging_folder("dee", "job_4", 1)
    staging.mkdir(parents=True)
    (staging / "adapter_model.safetensors").write_bytes(b"no config")
    with pytest.raises(IncompleteAdapterError, match=ADAPTER_CONFIG):
        store.publish(staging, "dee", 1)
    assert entries(store, "dee") == [staging.name]


def test_an_unrecorded_version_left_by_a_crash_is_replaced(tmp_path: Path) -> None:
    """A crash between rename and commit: the number is issued again, the folder replaced."""
    store = AdapterStore(tmp_path)
    first, second = (store.staging_folder("eve", f"job_{n}", 1) for n in (5, 6))
    write_adapter(first, b"never recorded")
    store.publish(first, "eve", 1)
    write_adapter(second, b"recorded")
    final = store.publish(second, "eve", 1)
    assert (final / "adapter_model.safetensors").read_bytes() == b"recorded"
    assert entries(store, "eve") == ["v1"]


def test_locate_follows_the_store_for_relative_and_old_absolute_paths(tmp_path: Path) -> None:
    old, new = AdapterStore(tmp_path / "old"), AdapterStore(tmp_path / "new")
    write_adapter(old.version_folder("fay", 1), b"w")
    write_adapter(new.version_folder("fay", 1), b"w")
    moved = new.version_folder("fay", 1).resolve()
    assert new.locate("fay/v1", "fay", 1) == moved
    assert new.locate(str(old.version_folder("fay", 1)), "fay", 1) == old.version_folder("fay", 1)
    assert new.locate(str(tmp_path / "gone" / "fay" / "v1"), "fay", 1) == moved


def test_remove_user_deletes_every_folder_of_the_user_only(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    write_adapter(store.version_folder("gus", 1), b"w")
    write_adapter(store.staging_folder("gus", "job_7", 1), b"w")
    write_adapter(store.version_folder("hal", 1), b"w")
    store.remove_user("gus")
    store.remove_user("nobody")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hal"]
