"""Adapter versions: publishing (the worker's register_adapter), listing, activation rules.

Runs on both databases through the shared live servers; no model is needed (an adapter folder
only has to be complete, i.e. hold adapter_config.json, to be registered and activated).
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest

from app.api.state import app_state
from app.core.db import transaction
from app.core.errors import InvalidRequest, NotFound
from app.services import adapters as adapter_service
from tests.support import Api, LiveServer, assert_error


def unique(prefix: str) -> str:
    """A user id no other test uses (adapter folders outlive the per-test row wipe)."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def publish(server: LiveServer, user_id: str, *, gate_passed: bool = True) -> Path:
    """Write a (config-only) adapter folder where the worker would, and register it."""
    with transaction(app_state(server.app).session_factory) as session:
        version = adapter_service.next_version(session, user_id)
        folder = server.settings.adapter_store.version_folder(user_id, version)
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
        adapter = adapter_service.register_adapter(
            session,
            user_id,
            folder,
            job_id=f"job-{version}",
            method="bapo",
            metrics={"retention_delta": 0.01 * version},
            gate_passed=gate_passed,
            gate_reason=None if gate_passed else "retention below threshold",
        )
        assert (adapter.version, adapter.name) == (version, f"user-{user_id}-v{version}")
    return folder


def listing(api: Api, user_id: str, headers: dict[str, str]) -> dict[str, object]:
    """GET /users/{id}/adapters, checked for 200."""
    response = api.http.get(f"/users/{user_id}/adapters", headers=headers)
    assert response.status_code == 200, response.text
    data: dict[str, object] = response.json()
    return data


def test_versions_are_numbered_and_gate_decides_activation(
    live_server: LiveServer, api: Api
) -> None:
    user_id, headers = api.create_user(unique("ada"))
    assert listing(api, user_id, headers) == {"data": [], "active_version": None, "pinned": False}
    publish(live_server, user_id)
    publish(live_server, user_id, gate_passed=False)  # kept, but not served by default
    data = listing(api, user_id, headers)
    assert data["active_version"] == 1
    rows = data["data"]
    assert isinstance(rows, list)
    assert [(r["version"], r["active"], r["gate_passed"]) for r in rows] == [
        (2, False, False),
        (1, True, True),
    ]
    assert rows[0]["gate_reason"] == "retention below threshold"
    assert rows[1]["metrics"] == {"retention_delta": 0.01} and rows[1]["available"] is True
    assert rows[1]["name"] == f"user-{user_id}-v1" and rows[1]["job_id"] == "job-1"
    user = api.http.get(f"/users/{user_id}", headers=headers).json()
    assert user["active_adapter_version"] == 1


def test_activate_rolls_forward_back_and_to_base(live_server: LiveServer, api: Api) -> None:
    user_id, headers = api.create_user(unique("bob"))
    publish(live_server, user_id)
    publish(live_server, user_id)
    for version, expected in (("v1", 1), ("2", 2), ("base", None), ("v2", 2)):
        response = api.http.post(f"/users/{user_id}/adapters/{version}/activate", headers=headers)
        assert response.status_code == 200, response.text
        assert response.json()["active_version"] == expected
        assert listing(api, user_id, headers)["active_version"] == expected


def test_activation_refusals(live_server: LiveServer, api: Api) -> None:
    user_id, headers = api.create_user(unique("cy"))
    folder = publish(live_server, user_id)
    url = f"/users/{user_id}/adapters/{{}}/activate"
    assert_error(api.http.post(url.format("v7"), headers=headers), 404, "adapter_not_found")
    assert_error(api.http.post(url.format("latest"), headers=headers), 422, "invalid_adapter")
    assert_error(api.http.post(url.format("active"), headers=headers), 422, "invalid_adapter")
    assert_error(api.http.post(url.format("v0"), headers=headers), 422, "invalid_adapter")
    shutil.rmtree(folder)
    assert_error(api.http.post(url.format("v1"), headers=headers), 409, "adapter_files_missing")
    rows = listing(api, user_id, headers)["data"]
    assert isinstance(rows, list) and rows[0]["available"] is False
    # A refused activation changes nothing.
    assert listing(api, user_id, headers)["active_version"] == 1


def test_other_users_adapters_are_out_of_reach(live_server: LiveServer, api: Api) -> None:
    owner, _ = api.create_user(unique("dee"))
    _, intruder = api.create_user(unique("eve"))
    publish(live_server, owner)
    assert_error(api.http.get(f"/users/{owner}/adapters", headers=intruder), 403, "wrong_user")
    assert_error(api.http.post(f"/users/{owner}/adapters/v1/activate", headers=intruder), 403)
    assert_error(
        api.http.get("/users/nobody/adapters", headers=api.operator), 404, "user_not_found"
    )
    assert listing(api, owner, api.operator)["active_version"] == 1


def test_register_refuses_incomplete_folders_and_unknown_users(
    live_server: LiveServer, api: Api, tmp_path: Path
) -> None:
    user_id, _ = api.create_user(unique("fay"))
    with transaction(app_state(live_server.app).session_factory) as session:
        with pytest.raises(InvalidRequest, match=r"adapter_config\.json"):
            adapter_service.register_adapter(
                session,
                user_id,
                tmp_path,
                job_id=None,
                method="bapo",
                metrics=None,
                gate_passed=True,
                gate_reason=None,
            )
        with pytest.raises(NotFound):
            adapter_service.register_adapter(
                session,
                "ghost",
                tmp_path,
                job_id=None,
                method="bapo",
                metrics=None,
                gate_passed=True,
                gate_reason=None,
            )
        (tmp_path / "adapter_config.json").write_text("{}")  # complete, but not <user>/v1
        with pytest.raises(InvalidRequest, match=r"must be <adapter store>/"):
            adapter_service.register_adapter(
                session,
                user_id,
                tmp_path,
                job_id=None,
                method="bapo",
                metrics=None,
                gate_passed=True,
                gate_reason=None,
            )
        assert adapter_service.next_version(session, user_id) == 1


def test_a_recreated_user_never_reuses_adapter_names(live_server: LiveServer, api: Api) -> None:
    user_id, headers = api.create_user(unique("again"))
    publish(live_server, user_id)
    publish(live_server, user_id)
    assert api.http.delete(f"/users/{user_id}", headers=headers).status_code == 204
    _, headers = api.create_user(user_id)
    publish(live_server, user_id)  # asserts the version it gets, below
    versions = [a["version"] for a in listing(api, user_id, headers)["data"]]  # type: ignore[index]
    assert versions == [3]


def activate(api: Api, user_id: str, version: str, headers: dict[str, str]) -> dict[str, object]:
    """POST /users/{id}/adapters/{version}/activate, checked for 200; the listing it returns."""
    response = api.http.post(f"/users/{user_id}/adapters/{version}/activate", headers=headers)
    assert response.status_code == 200, response.text
    data: dict[str, object] = response.json()
    return data


def active_and_pinned(api: Api, user_id: str, headers: dict[str, str]) -> tuple[object, object]:
    """(active_version, pinned) from the listing."""
    data = listing(api, user_id, headers)
    return data["active_version"], data.get("pinned")


def test_a_rollback_pins_until_the_newest_version_is_activated(
    live_server: LiveServer, api: Api
) -> None:
    user_id, headers = api.create_user(unique("pin"))
    publish(live_server, user_id)
    publish(live_server, user_id)
    activate(api, user_id, "v1", headers)  # the user rolls back
    publish(live_server, user_id)  # v3 passes the gate (e.g. a scheduled retrain)
    assert listing(api, user_id, headers)["active_version"] == 1, "the rollback was undone"
    assert active_and_pinned(api, user_id, headers) == (1, True)
    rows = listing(api, user_id, headers)["data"]
    assert isinstance(rows, list) and [r["active"] for r in rows] == [False, False, True]
    activate(api, user_id, "v3", headers)  # the newest version: the pin is cleared
    assert active_and_pinned(api, user_id, headers) == (3, False)
    publish(live_server, user_id)
    assert active_and_pinned(api, user_id, headers) == (4, False)


def test_unpin_and_a_pin_on_the_base_model(live_server: LiveServer, api: Api) -> None:
    user_id, headers = api.create_user(unique("unpin"))
    publish(live_server, user_id)
    activate(api, user_id, "base", headers)  # choosing the base model is a pin too
    publish(live_server, user_id)
    assert listing(api, user_id, headers)["active_version"] is None, "the choice was undone"
    assert active_and_pinned(api, user_id, headers) == (None, True)
    response = api.http.post(f"/users/{user_id}/adapters/unpin", headers=headers)
    assert response.status_code == 200, response.text
    assert (response.json()["active_version"], response.json()["pinned"]) == (None, False)
    publish(live_server, user_id)  # unpinned: the next version that passes becomes active
    assert active_and_pinned(api, user_id, headers) == (3, False)
    _, intruder = api.create_user(unique("mallory"))
    assert_error(api.http.post(f"/users/{user_id}/adapters/unpin", headers=intruder), 403)
