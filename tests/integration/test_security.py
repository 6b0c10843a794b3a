"""Security: no route crosses users, operator-only routes, hashed keys, CORS, rate limits."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from app.api.state import app_state
from app.core.ratelimit import TokenBuckets
from tests.support import Api, LiveServer, assert_error, make_settings

# Routes that answer about the caller itself (or nobody), so another user's key is not a breach.
PUBLIC_OR_OWN = {
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/whoami"),
    ("GET", "/v1/models"),
    ("GET", "/v1/files"),  # the caller's own files
    ("POST", "/v1/files"),  # a file of the caller's own
    ("GET", "/v1/fine_tuning/jobs"),  # the caller's own jobs
}
OPERATOR_ONLY = {("POST", "/users"), ("GET", "/users")}
PAIR = {"prompt": "p", "chosen": "good", "rejected": "bad"}


def _operations(server: LiveServer) -> list[tuple[str, str]]:
    """(METHOD, path template) for every operation in the app's OpenAPI document."""
    paths = server.app.openapi()["paths"]
    return [(m.upper(), p) for p, ops in paths.items() for m in ops]


def _body(method: str, path: str, victim: str) -> dict[str, Any] | None:
    """A valid body for the operation, aimed at the victim."""
    if path == "/v1/chat/completions":
        return {"model": f"user:{victim}", "messages": [{"role": "user", "content": "hi"}]}
    if path == "/v1/fine_tuning/jobs":
        return {"model": f"user:{victim}"}
    if path == "/v1/completions":
        return {"model": f"user:{victim}", "prompt": "hi", "max_tokens": 1}
    if path.endswith("/generate"):
        return {"prompt": "hi", "max_tokens": 1}
    if path.endswith("/feedback") and method == "POST":
        return PAIR
    return None


@pytest.fixture
def victim_and_attacker(api: Api) -> tuple[str, dict[str, str], dict[str, str], int]:
    """A victim with one pair, and an attacker with their own key."""
    victim, victim_auth = api.create_user("victim")
    _, attacker_auth = api.create_user("attacker")
    created = api.http.post(f"/users/{victim}/feedback", json=PAIR, headers=victim_auth)
    assert created.status_code == 201, created.text
    pair_id = int(created.json()["pairs"][0]["id"])
    return victim, victim_auth, attacker_auth, pair_id


def test_no_route_reaches_another_users_data(
    api: Api, live_server: LiveServer, victim_and_attacker: tuple[Any, ...]
) -> None:
    victim, victim_auth, attacker_auth, pair_id = victim_and_attacker
    (victim_key,) = api.http.get(f"/users/{victim}/keys", headers=api.operator).json()["data"]
    fill = {"user_id": victim, "pair_id": str(pair_id), "job_id": "job_x", "version": "v1"}
    fill["key_id"] = str(victim_key["id"])
    fill["model_id"] = f"user:{victim}"
    upload = {"file": ("p.jsonl", b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n')}
    stored = api.http.post(
        "/v1/files", files=upload, data={"purpose": "fine-tune"}, headers=victim_auth
    )
    assert stored.status_code == 200, stored.text
    fill["file_id"] = stored.json()["id"]
    tried = 0
    for method, template in _operations(live_server):
        if (method, template) in PUBLIC_OR_OWN:
            continue
        path = re.sub(r"\{(\w+)\}", lambda m: fill[m.group(1)], template)
        body = _body(method, template, victim)
        response = api.http.request(method, path, json=body, headers=attacker_auth)
        tried += 1
        assert response.status_code in (403, 404), (method, path, response.text)
        assert_error(response, response.status_code)
    assert tried >= 13
    pairs = api.http.get(f"/users/{victim}/feedback", headers=victim_auth).json()["data"]
    assert [p["id"] for p in pairs] == [pair_id]  # nothing deleted, nothing added; key still works
    files = api.http.get("/v1/files", headers=victim_auth).json()["data"]
    assert [f["id"] for f in files] == [fill["file_id"]]
    models = api.http.get("/v1/models", headers=attacker_auth).json()["data"]
    assert all("victim" not in m["id"] for m in models), models
    whoami = api.http.get("/whoami", headers=attacker_auth).json()
    assert whoami == {"operator": False, "user_id": "attacker"}


def test_operator_only_routes_refuse_user_keys(api: Api, live_server: LiveServer) -> None:
    _, user_auth = api.create_user("plain")
    operations = set(_operations(live_server))
    assert operations >= OPERATOR_ONLY
    for method, path in OPERATOR_ONLY:
        body = {"id": "intruder"} if method == "POST" else None
        response = api.http.request(method, path, json=body, headers=user_auth)
        assert_error(response, 403, "operator_only")
    assert api.http.get("/users/intruder", headers=api.operator).status_code == 404


def test_keys_are_stored_hashed_and_looked_up_by_hash(api: Api, live_server: LiveServer) -> None:
    user_id, auth = api.create_user("hashed")
    key = auth["Authorization"].removeprefix("Bearer ")
    with app_state(live_server.app).engine.connect() as conn:
        rows = conn.execute(text("SELECT key_hash, prefix FROM api_keys")).all()
        dump = " ".join(str(v) for row in conn.execute(text("SELECT * FROM api_keys")) for v in row)
    assert key not in dump
    assert hashlib.sha256(key.encode()).hexdigest() in {r.key_hash for r in rows}
    assert api.http.get("/whoami", headers=auth).json()["user_id"] == user_id
    near_misses = [key[:-1], key + "x", key.upper(), hashlib.sha256(key.encode()).hexdigest()]
    for wrong in near_misses:
        response = api.http.get("/whoami", headers={"Authorization": f"Bearer {wrong}"})
        assert_error(response, 401, "invalid_api_key")
    assert_error(api.http.get(f"/users/{user_id}"), 401, "missing_api_key")


def test_vllm_admin_routes_are_not_exposed(api: Api) -> None:
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        body = {"lora_name": "x", "lora_path": "/etc"}
        response = api.http.post(path, json=body, headers=api.operator)
        assert_error(response, 404, "route_not_found")


@pytest.fixture(scope="module")
def cors_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A SQLite server that allows one origin and has tight rate limits."""
    settings = make_settings(
        tmp_path_factory.mktemp("cors"),
        cors_origins=["https://app.example"],
        rate_limit_generate_per_min=2,
        rate_limit_train_per_hour=2,
    )
    server = LiveServer(settings).start()
    yield server
    server.stop()


def _preflight(base: str, origin: str) -> httpx.Response:
    headers = {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    return httpx.options(f"{base}/users", headers=headers)


def test_cors_closed_by_default(live_server: LiveServer) -> None:
    origin = {"Origin": "https://evil.example"}
    response = httpx.get(f"{live_server.url}/healthz", headers=origin)
    assert "access-control-allow-origin" not in response.headers
    preflight = _preflight(live_server.url, "https://evil.example")
    assert preflight.status_code >= 400
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_open_only_for_configured_origins(cors_server: LiveServer) -> None:
    allowed = httpx.get(f"{cors_server.url}/healthz", headers={"Origin": "https://app.example"})
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    preflight = _preflight(cors_server.url, "https://app.example")
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    foreign = httpx.get(f"{cors_server.url}/healthz", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in foreign.headers
    assert _preflight(cors_server.url, "https://evil.example").status_code == 400


def test_train_rate_limited_per_user_with_retry_after(cors_server: LiveServer) -> None:
    api = Api(cors_server.url)
    try:
        user_id, auth = api.create_user("limited_trainer")
        _, other_auth = api.create_user("other_trainer")
        path = f"/users/{user_id}/train"
        for _ in range(2):  # no pairs yet: refused before anything is queued, but counted
            assert_error(api.http.post(path, headers=auth), 422, "not_enough_pairs")
        limited = api.http.post(path, headers=auth)
        assert_error(limited, 429, "rate_limited")
        assert 1 <= int(limited.headers["Retry-After"]) <= 1800
        # Another user has their own bucket; the operator key is exempt.
        other = api.http.post("/users/other_trainer/train", headers=other_auth)
        assert_error(other, 422, "not_enough_pairs")
        for _ in range(3):
            assert_error(api.http.post(path, headers=api.operator), 422, "not_enough_pairs")
    finally:
        api.close()


def test_generate_and_chat_share_a_rate_limit(cors_server: LiveServer) -> None:
    api = Api(cors_server.url)
    try:
        user_id, auth = api.create_user("limited_generator")
        bad = {"prompt": "hi", "max_tokens": -1}  # refused before the model, but counted
        for _ in range(2):
            response = api.http.post(f"/users/{user_id}/generate", json=bad, headers=auth)
            assert_error(response, 422)
        chat = {"model": f"user:{user_id}", "messages": [{"role": "user", "content": "hi"}]}
        limited = api.http.post("/v1/chat/completions", json=chat, headers=auth)
        assert_error(limited, 429, "rate_limited")
        assert 1 <= int(limited.headers["Retry-After"]) <= 30
    finally:
        api.close()


def test_token_bucket_refills_at_the_configured_rate() -> None:
    now = [0.0]
    buckets = TokenBuckets(limit=3, period_s=60, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(20.0)
    assert buckets.take("b") == 0.0
    now[0] = 20.0
    assert buckets.take("a") == 0.0
    assert buckets.take("a") == pytest.approx(20.0)
    now[0] = 10_000.0  # a long idle time refills only up to the limit
    assert [buckets.take("a") for _ in range(4)][-1] == pytest.approx(20.0)
