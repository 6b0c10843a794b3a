"""Several API keys per user: issue, list (prefix only), revoke, over real HTTP and the `bapo` CLI.

The HTTP tests run on both databases through the shared live servers; the CLI test runs the real
`bapo` process against a fresh Postgres database that a live server of its own also serves.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command
from sqlalchemy import create_engine, inspect, select, text, update

from app.api.state import app_state
from app.core.db import alembic_config, transaction
from app.core.security import hash_key
from app.models import ApiKey, utcnow
from app.services import adapters as adapter_service
from tests.support import Api, LiveServer, assert_error, make_settings, postgres_database
from tests.worker_support import operator_env
from tests.worker_support import run_bapo as bapo

KEY_FIELDS = {"id", "user_id", "prefix", "name", "created_at", "last_used_at"}


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def issue(api: Api, user_id: str, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    """POST /users/{id}/keys, checked for 201; the answer (with the secret)."""
    response = api.http.post(f"/users/{user_id}/keys", json=body, headers=headers)
    assert response.status_code == 201, response.text
    issued: dict[str, Any] = response.json()
    return issued


def keys_of(api: Api, user_id: str, **params: Any) -> dict[str, Any]:
    """GET /users/{id}/keys as the operator, checked for 200."""
    response = api.http.get(f"/users/{user_id}/keys", params=params, headers=api.operator)
    assert response.status_code == 200, response.text
    page: dict[str, Any] = response.json()
    return page


def publish_adapter(server: LiveServer, user_id: str) -> None:
    """Register a (config-only) adapter folder for the user, as the worker would."""
    with transaction(app_state(server.app).session_factory) as session:
        version = adapter_service.next_version(session, user_id)
        folder = server.settings.adapter_store.version_folder(user_id, version)
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
        adapter_service.register_adapter(
            session,
            user_id,
            folder,
            job_id=None,
            method="bapo",
            metrics={},
            gate_passed=True,
            gate_reason=None,
        )


def set_last_used(server: LiveServer, key_id: int, ago: timedelta | None) -> None:
    with app_state(server.app).engine.begin() as conn:
        when = utcnow() - ago if ago is not None else None
        conn.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=when))


def test_two_more_keys_all_work_and_the_list_shows_prefixes_only(api: Api) -> None:
    _, first = api.create_user("alice")
    laptop = issue(api, "alice", api.operator, name="  laptop ")
    assert set(laptop) == KEY_FIELDS | {"api_key"}
    assert laptop["api_key"].startswith("bapo_") and laptop["prefix"] == laptop["api_key"][:12]
    assert (laptop["user_id"], laptop["name"], laptop["last_used_at"]) == ("alice", "laptop", None)
    ci = issue(api, "alice", first)  # the user's own key may issue one; no body, no name
    assert ci["name"] is None and ci["api_key"] != laptop["api_key"]
    for secret in (laptop["api_key"], ci["api_key"]):
        assert api.http.get("/users/alice", headers=bearer(secret)).status_code == 200

    response = api.http.get("/users/alice/keys", headers=first)
    assert response.status_code == 200
    listed = response.json()["data"]
    assert [k["id"] for k in listed] == [ci["id"], laptop["id"], listed[2]["id"]]  # newest first
    assert all(set(k) == KEY_FIELDS for k in listed)
    first_secret = first["Authorization"].removeprefix("Bearer ")
    for secret in (first_secret, laptop["api_key"], ci["api_key"]):
        assert secret not in response.text and hash_key(secret) not in response.text
        assert secret[:12] in {k["prefix"] for k in listed}

    page = keys_of(api, "alice", limit=2)
    assert [k["id"] for k in page["data"]] == [ci["id"], laptop["id"]] and page["has_more"]
    rest = keys_of(api, "alice", limit=2, cursor=page["next_cursor"])
    assert [k["id"] for k in rest["data"]] == [listed[2]["id"]] and not rest["has_more"]


def test_a_revoked_key_fails_at_once_and_the_users_data_stays(
    live_server: LiveServer, api: Api
) -> None:
    user = unique("alice")
    _, own = api.create_user(user)
    pair = {"prompt": "Explain recursion.", "chosen": "It calls itself.", "rejected": "No."}
    assert api.http.post(f"/users/{user}/feedback", json=pair, headers=own).status_code == 201
    publish_adapter(live_server, user)
    before = [
        api.http.get(p, headers=own).json()
        for p in (f"/users/{user}/feedback", f"/users/{user}/adapters")
    ]
    spare = issue(api, user, own, name="spare")
    assert api.http.get(f"/users/{user}", headers=bearer(spare["api_key"])).status_code == 200

    response = api.http.delete(f"/users/{user}/keys/{spare['id']}", headers=own)
    assert response.status_code == 204 and response.content == b""
    revoked = api.http.get(f"/users/{user}", headers=bearer(spare["api_key"]))
    assert_error(revoked, 401, "invalid_api_key")
    assert api.http.get(f"/users/{user}", headers=own).status_code == 200
    after = [
        api.http.get(p, headers=own).json()
        for p in (f"/users/{user}/feedback", f"/users/{user}/adapters")
    ]
    assert after == before and after[1]["active_version"] == 1
    assert spare["id"] not in [k["id"] for k in keys_of(api, user)["data"]]
    again = api.http.delete(f"/users/{user}/keys/{spare['id']}", headers=own)
    assert_error(again, 404, "api_key_not_found")


def test_the_last_key_may_be_revoked_and_the_operator_issues_a_new_one(api: Api) -> None:
    _, own = api.create_user("alice")
    (only,) = keys_of(api, "alice")["data"]
    assert api.http.delete(f"/users/alice/keys/{only['id']}", headers=own).status_code == 204
    assert_error(api.http.get("/users/alice", headers=own), 401, "invalid_api_key")
    assert keys_of(api, "alice")["data"] == []
    fresh = issue(api, "alice", api.operator, name="replacement")
    assert api.http.get("/users/alice/keys", headers=bearer(fresh["api_key"])).status_code == 200


def test_another_users_key_is_refused(api: Api) -> None:
    _, alice = api.create_user("alice")
    _, bob = api.create_user("bob")
    (alice_key,) = keys_of(api, "alice")["data"]
    for method, path in [
        ("POST", "/users/alice/keys"),
        ("GET", "/users/alice/keys"),
        ("DELETE", f"/users/alice/keys/{alice_key['id']}"),
    ]:
        assert_error(api.http.request(method, path, headers=bob), 403, "wrong_user")
    # Alice's key id under bob's own path (or the operator's) is not bob's key: nothing happens.
    for headers in (bob, api.operator):
        response = api.http.delete(f"/users/bob/keys/{alice_key['id']}", headers=headers)
        assert_error(response, 404, "api_key_not_found")
    assert api.http.get("/users/alice", headers=alice).status_code == 200
    assert len(keys_of(api, "alice")["data"]) == len(keys_of(api, "bob")["data"]) == 1


def test_bad_input_is_refused_in_the_one_shape_and_changes_nothing(api: Api) -> None:
    _, alice = api.create_user("alice")
    before = keys_of(api, "alice")["data"]
    url = "/users/alice/keys"
    for body, status, code in [
        ({"name": ""}, 422, "invalid_key_name"),
        ({"name": "   "}, 422, "invalid_key_name"),
        ({"name": "tab\there"}, 422, "invalid_key_name"),
        ({"name": "nul\u0000"}, 422, "invalid_key_name"),
        ({"name": "x" * 101}, 422, "validation_error"),
        ({"name": 7}, 422, "validation_error"),
        ({"label": "laptop"}, 422, "validation_error"),
    ]:
        error = assert_error(api.http.post(url, json=body, headers=alice), status, code)
        assert error["param"] in ("name", "label"), error
    malformed = api.http.post(
        url, content=b'{"name": ', headers={**alice, "Content-Type": "application/json"}
    )
    assert_error(malformed, 400, "invalid_json")
    for key_id in ("abc", "0", "-1", str(2**40)):
        assert_error(api.http.delete(f"{url}/{key_id}", headers=alice), 422, "validation_error")
    assert_error(api.http.get(url, params={"cursor": "x"}, headers=alice), 400, "invalid_cursor")
    assert_error(api.http.get(url, params={"limit": 0}, headers=alice), 422, "validation_error")
    for method, path in [
        ("POST", "/users/ghost/keys"),
        ("GET", "/users/ghost/keys"),
        ("DELETE", "/users/ghost/keys/1"),
    ]:
        response = api.http.request(method, path, headers=api.operator)
        assert_error(response, 404, "user_not_found")
    assert_error(api.http.post(url), 401, "missing_api_key")
    after = keys_of(api, "alice")["data"]
    assert [{**k, "last_used_at": None} for k in after] == before  # only its use was recorded


def test_last_used_is_recorded_at_most_once_a_minute(live_server: LiveServer, api: Api) -> None:
    api.create_user("alice")
    key = issue(api, "alice", api.operator)
    headers = bearer(key["api_key"])

    def last_used() -> datetime | None:
        (row,) = [k for k in keys_of(api, "alice")["data"] if k["id"] == key["id"]]
        return datetime.fromisoformat(row["last_used_at"]) if row["last_used_at"] else None

    assert last_used() is None  # the operator's requests are not a use of the key
    assert api.http.get("/users/alice", headers=headers).status_code == 200
    first = last_used()
    assert first is not None
    assert api.http.get("/users/alice/feedback", headers=headers).status_code == 200
    assert last_used() == first  # not rewritten within the minute
    set_last_used(live_server, key["id"], timedelta(minutes=2))
    stale = last_used()
    assert api.http.get("/users/alice", headers=headers).status_code == 200
    assert stale is not None and (last_used() or stale) - stale > timedelta(seconds=100)


def test_a_locked_key_row_never_holds_up_the_request(live_server: LiveServer, api: Api) -> None:
    """A revoke or another replica's write in progress: the use is skipped, not waited for."""
    if live_server.settings.is_sqlite:
        pytest.skip("SQLite has no row locks (its writes are serialized by the database lock)")
    api.create_user("alice")
    key = issue(api, "alice", api.operator)
    engine = create_engine(live_server.settings.database_url)
    try:
        with engine.connect() as other:
            other.execute(select(ApiKey.id).where(ApiKey.id == key["id"]).with_for_update())
            started = time.monotonic()
            response = api.http.get("/users/alice", headers=bearer(key["api_key"]), timeout=10)
            assert response.status_code == 200 and time.monotonic() - started < 5
            other.rollback()
    finally:
        engine.dispose()
    assert keys_of(api, "alice")["data"][0]["last_used_at"] is None  # skipped, not queued
    assert api.http.get("/users/alice", headers=bearer(key["api_key"])).status_code == 200
    assert keys_of(api, "alice")["data"][0]["last_used_at"] is not None


def test_operator_cli_issues_lists_and_revokes_keys_the_api_honours(tmp_path: Path) -> None:
    with operator_env(tmp_path / "cli") as env:
        server = LiveServer(make_settings(tmp_path / "data", env["DATABASE_URL"])).start()
        try:
            check_cli_keys(env, server.url)
        finally:
            server.stop()


def check_cli_keys(env: dict[str, str], url: str) -> None:
    first = bapo(env, "create-user", "--id", "carol")["api_key"]
    issued = bapo(env, "issue-key", "--id", "carol", "--name", "ci")
    assert set(issued) == KEY_FIELDS | {"api_key"} and issued["name"] == "ci"
    secret = issued["api_key"]
    assert httpx.get(f"{url}/users/carol", headers=bearer(secret)).status_code == 200

    listing = bapo(env, "list-keys", "--id", "carol", "--json", ok=False)
    assert listing.returncode == 0
    for plain in (first, secret):
        assert plain not in listing.stdout and hash_key(plain) not in listing.stdout
    rows = json.loads(listing.stdout)
    assert [r["id"] for r in rows] == [issued["id"], rows[1]["id"]]
    assert all(set(r) == KEY_FIELDS for r in rows) and rows[0]["last_used_at"] is not None
    table = bapo(env, "list-keys", "--id", "carol")
    assert issued["prefix"] in table and "ci" in table and secret not in table

    revoked = bapo(env, "revoke-key", "--id", "carol", "--key-id", str(issued["id"]))
    assert revoked == {"id": "carol", "revoked": issued["id"], "keys_left": 1}
    assert httpx.get(f"{url}/users/carol", headers=bearer(secret)).status_code == 401
    assert httpx.get(f"{url}/users/carol", headers=bearer(first)).status_code == 200

    again = bapo(env, "revoke-key", "--id", "carol", "--key-id", str(issued["id"]), ok=False)
    assert again.returncode == 1 and "not found" in again.stderr
    assert bapo(env, "list-keys", "--id", "nobody", ok=False).returncode == 1
    assert bapo(env, "revoke-key", "--id", "carol", "--key-id", "x", ok=False).returncode == 2
    empty_name = bapo(env, "issue-key", "--id", "carol", "--name", " ", ok=False)
    assert empty_name.returncode == 2 and "name" in empty_name.stderr
    assert len(bapo(env, "list-keys", "--id", "carol", "--json")) == 1


@pytest.mark.parametrize("kind", ["postgres", "sqlite"])
def test_migration_0007_upgrades_and_downgrades_keeping_keys(kind: str, tmp_path: Path) -> None:
    if kind == "sqlite":
        check_migration_0007(f"sqlite:///{tmp_path / 'keys.sqlite3'}")
        return
    with postgres_database(migrate=False) as url:
        check_migration_0007(url)


def check_migration_0007(url: str) -> None:
    config = alembic_config(url)
    command.upgrade(config, "0006")
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            now = {"now": utcnow().isoformat()}
            conn.execute(text("INSERT INTO users (id, created_at) VALUES ('dan', :now)"), now)
            conn.execute(
                text(
                    "INSERT INTO api_keys (user_id, key_hash, prefix, created_at)"
                    " VALUES ('dan', :hash, 'bapo_abc', :now)"
                ),
                {**now, "hash": "h" * 64},
            )
        command.upgrade(config, "0007")
        assert {"name", "last_used_at"} <= columns(engine)
        with engine.connect() as conn:
            kept = conn.execute(text("SELECT prefix, name, last_used_at FROM api_keys")).all()
        assert [tuple(row) for row in kept] == [("bapo_abc", None, None)]
        command.downgrade(config, "0006")
        assert columns(engine) == {"id", "user_id", "key_hash", "prefix", "created_at"}
        with engine.connect() as conn:
            assert conn.execute(text("SELECT user_id, prefix FROM api_keys")).all() == [
                ("dan", "bapo_abc")
            ]
        command.upgrade(config, "0007")
        assert {"name", "last_used_at"} <= columns(engine)
    finally:
        engine.dispose()


def columns(engine: Any) -> set[str]:
    return {c["name"] for c in inspect(engine).get_columns("api_keys")}


def unique(prefix: str) -> str:
    """A user id no other test uses (adapter folders outlive the per-test row wipe)."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
