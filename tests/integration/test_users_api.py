"""Users and auth over real HTTP, against Postgres and SQLite."""

from __future__ import annotations

from tests.support import Api, assert_error


def test_operator_creates_user_with_given_id(api: Api) -> None:
    response = api.http.post("/users", json={"id": "alice.v2_x-1"}, headers=api.operator)
    assert response.status_code == 201
    body = response.json()
    assert body["id"] == "alice.v2_x-1"
    assert body["api_key"].startswith("bapo_") and len(body["api_key"]) > 40
    got = api.http.get(
        "/users/alice.v2_x-1", headers={"Authorization": f"Bearer {body['api_key']}"}
    )
    assert got.status_code == 200
    assert got.json() == {
        "id": "alice.v2_x-1",
        "created_at": got.json()["created_at"],
        "pair_count": 0,
        "active_adapter_version": None,
    }


def test_generated_ids_are_unique(api: Api) -> None:
    first, _ = api.create_user()
    second, _ = api.create_user()
    assert first != second and first.startswith("u_")


def test_duplicate_user_is_409(api: Api) -> None:
    api.create_user("bob")
    assert_error(
        api.http.post("/users", json={"id": "bob"}, headers=api.operator), 409, "user_exists"
    )


def test_invalid_user_ids_are_refused(api: Api) -> None:
    for bad in ["", "a" * 65, "has space", "slash/x", "..", ".", "ünï"]:
        response = api.http.post("/users", json={"id": bad}, headers=api.operator)
        assert_error(response, 422)
    # ("/users/.." is normalised to "/" by the HTTP client itself; the encoded forms reach us.)
    for bad_path in ["%2E%2E", "%2e", "a%20b", "x" * 65]:
        response = api.http.get(f"/users/{bad_path}", headers=api.operator)
        assert response.status_code in (404, 422), bad_path
        assert "error" in response.json()


def test_only_the_operator_creates_or_lists_users(api: Api) -> None:
    _, alice = api.create_user("alice")
    assert_error(api.http.post("/users", json={}, headers=alice), 403, "operator_only")
    assert_error(api.http.get("/users", headers=alice), 403, "operator_only")


def test_missing_and_invalid_keys_are_401(api: Api) -> None:
    api.create_user("alice")
    assert_error(api.http.get("/users/alice"), 401, "missing_api_key")
    assert_error(
        api.http.get("/users/alice", headers={"Authorization": "Bearer nope"}),
        401,
        "invalid_api_key",
    )
    assert_error(api.http.post("/users", json={}), 401)


def test_a_user_key_reaches_only_its_own_user(api: Api) -> None:
    _, alice = api.create_user("alice")
    _, bob = api.create_user("bob")
    api.http.post(
        "/users/bob/feedback", json={"prompt": "p", "chosen": "a", "rejected": "b"}, headers=bob
    )
    for method, path in [
        ("GET", "/users/bob"),
        ("DELETE", "/users/bob"),
        ("GET", "/users/bob/feedback"),
        ("POST", "/users/bob/feedback"),
        ("DELETE", "/users/bob/feedback/1"),
        ("GET", "/users/nobody"),
    ]:
        body = {"prompt": "p", "chosen": "a", "rejected": "b"} if method == "POST" else None
        response = api.http.request(method, path, json=body, headers=alice)
        assert_error(response, 403, "wrong_user")
    assert api.http.get("/users/bob", headers=bob).json()["pair_count"] == 1


def test_unknown_user_is_404_for_operator(api: Api) -> None:
    assert_error(api.http.get("/users/ghost", headers=api.operator), 404, "user_not_found")
    assert_error(api.http.delete("/users/ghost", headers=api.operator), 404, "user_not_found")
    response = api.http.post(
        "/users/ghost/feedback",
        headers=api.operator,
        json={"prompt": "p", "chosen": "a", "rejected": "b"},
    )
    assert_error(response, 404, "user_not_found")


def test_delete_user_erases_everything(api: Api) -> None:
    _, alice = api.create_user("alice")
    pair = {"prompt": "p", "chosen": "a", "rejected": "b"}
    assert (
        api.http.post(
            "/users/alice/feedback",
            json=pair,
            headers=alice,
        ).status_code
        == 201
    )
    assert api.http.delete("/users/alice", headers=alice).status_code == 204
    assert_error(api.http.get("/users/alice", headers=api.operator), 404)
    assert_error(api.http.get("/users/alice", headers=alice), 401, "invalid_api_key")
    # The id can be reused and starts empty.
    _, again = api.create_user("alice")
    assert api.http.get("/users/alice/feedback", headers=again).json()["data"] == []


def test_operator_lists_users_paged(api: Api) -> None:
    for name in ["u1", "u2", "u3"]:
        api.create_user(name)
    first = api.http.get("/users", params={"limit": 2}, headers=api.operator).json()
    assert [u["id"] for u in first["data"]] == ["u1", "u2"] and first["has_more"]
    rest = api.http.get(
        "/users", params={"limit": 2, "cursor": first["next_cursor"]}, headers=api.operator
    ).json()
    assert [u["id"] for u in rest["data"]] == ["u3"] and not rest["has_more"]


def test_health_ready_and_openapi(api: Api) -> None:
    assert api.http.get("/healthz").json() == {"status": "ok"}
    ready = api.http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["database"]["ok"] is True
    spec = api.http.get("/openapi.json").json()
    for path in [
        "/users",
        "/users/{user_id}",
        "/users/{user_id}/feedback",
        "/users/{user_id}/feedback/{pair_id}",
        "/healthz",
        "/readyz",
    ]:
        assert path in spec["paths"], path
    assert api.http.get("/docs").status_code == 200


def test_unknown_route_and_method_use_the_error_shape(api: Api) -> None:
    assert_error(api.http.get("/nope"), 404, "route_not_found")
    assert_error(api.http.put("/users", headers=api.operator), 405, "method_not_allowed")


def test_request_id_is_echoed(api: Api) -> None:
    response = api.http.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    assert len(api.http.get("/healthz").headers["x-request-id"]) == 32


def test_metrics_count_requests_by_route_and_pairs(api: Api) -> None:
    _, alice = api.create_user("alice")
    pair = {"prompt": "p", "chosen": "a", "rejected": "b"}
    api.http.post("/users/alice/feedback", json={"pairs": [pair, pair]}, headers=alice)
    text = api.http.get("/metrics", headers=api.operator).text
    assert (
        'bapo_http_requests_total{method="POST",route="/users/{user_id}/feedback",status="201"}'
        in text
    )
    assert "bapo_feedback_pairs_stored_total" in text
    assert 'bapo_training_jobs{status="queued"}' in text
