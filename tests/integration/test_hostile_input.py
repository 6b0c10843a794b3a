"""Hostile and malformed input: every case is refused with a clear 4xx, or stored verbatim."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support import Api, assert_error

PAIR = {"prompt": "p", "chosen": "good", "rejected": "bad"}
PAYLOADS = [
    "'; DROP TABLE preference_pairs; --",
    '" OR 1=1 --',
    "<script>alert('x')</script>",
    "<img src=x onerror=alert(1)>&amp;&lt;",
    "{{7*7}} ${7*7} %s %n",
    "Ünïcødé 😀 \u202e right-to-left \u200b zero-width",
    "tab\tnew\nline\rreturn \x1b[31m escape \x7f",
]


@pytest.fixture
def user(api: Api) -> tuple[str, dict[str, str]]:
    return api.create_user("hostile")


def _post_raw(api: Api, user: tuple[str, dict[str, str]], content: bytes) -> Any:
    headers = {**user[1], "Content-Type": "application/json"}
    return api.http.post(f"/users/{user[0]}/feedback", content=content, headers=headers)


def test_deeply_nested_json_is_refused(api: Api, user: tuple[str, dict[str, str]]) -> None:
    for depth in (1_000, 100_000):
        nested = b'{"prompt": ' + b"[" * depth + b"]" * depth + b', "chosen": "a", "rejected": "b"}'
        response = _post_raw(api, user, nested)
        assert 400 <= response.status_code < 500, (depth, response.status_code)
        assert_error(response, response.status_code)


def test_invalid_utf8_and_broken_json_are_400(api: Api, user: tuple[str, dict[str, str]]) -> None:
    bodies = [
        b'{"prompt": "\xff\xfe", "chosen": "a", "rejected": "b"}',
        b'{"prompt": "\xed\xa0\x80", "chosen": "a", "rejected": "b"}',  # UTF-8 surrogate
        b'{"prompt": "a", "chosen": "a", "rejected": ',
        b"\x00\x01\x02",
    ]
    for body in bodies:
        response = _post_raw(api, user, body)
        assert response.status_code in (400, 422), (body, response.text)
        assert_error(response, response.status_code)


def test_lone_surrogate_escape_is_refused(api: Api, user: tuple[str, dict[str, str]]) -> None:
    response = _post_raw(api, user, b'{"prompt": "\\ud800", "chosen": "a", "rejected": "b"}')
    assert assert_error(response, 422, "invalid_text")["param"] == "prompt"


def test_nul_character_is_refused_on_every_database(
    api: Api, user: tuple[str, dict[str, str]]
) -> None:
    pair = {**PAIR, "chosen": "before\x00after"}
    response = api.http.post(f"/users/{user[0]}/feedback", json=pair, headers=user[1])
    assert assert_error(response, 422, "invalid_text")["param"] == "chosen"


def test_payloads_are_stored_and_returned_verbatim(
    api: Api, user: tuple[str, dict[str, str]]
) -> None:
    user_id, auth = user
    pairs = [{"prompt": text, "chosen": text, "rejected": text + "!"} for text in PAYLOADS]
    created = api.http.post(f"/users/{user_id}/feedback", json={"pairs": pairs}, headers=auth)
    assert created.status_code == 201, created.text
    listed = api.http.get(f"/users/{user_id}/feedback", params={"limit": 100}, headers=auth)
    stored = {p["chosen"] for p in listed.json()["data"]}
    assert stored == set(PAYLOADS)
    assert api.http.get("/users", headers=api.operator).status_code == 200  # tables still there


def test_text_limits_exact_and_one_over(api: Api, user: tuple[str, dict[str, str]]) -> None:
    user_id, auth = user
    limit = 8000  # MAX_TEXT_CHARS default
    at_limit = {**PAIR, "chosen": "x" * limit}
    ok = api.http.post(f"/users/{user_id}/feedback", json=at_limit, headers=auth)
    assert ok.status_code == 201, ok.text
    for field in ("prompt", "chosen", "rejected"):
        over = {**PAIR, field: "é" * (limit + 1)}
        response = api.http.post(f"/users/{user_id}/feedback", json=over, headers=auth)
        error = assert_error(response, 422)
        assert field in error.get("param", ""), error


def test_huge_body_is_413(api: Api, user: tuple[str, dict[str, str]]) -> None:
    body = b'{"prompt": "' + b"a" * 1_100_000 + b'", "chosen": "a", "rejected": "b"}'
    assert_error(_post_raw(api, user, body), 413)


@pytest.mark.parametrize(
    "path",
    [
        "/users/../users",
        "/users/%2e%2e",
        "/users/%2E%2E/feedback",
        "/users/..%2f..%2fetc",
        "/users/hostile%2f..%2f..%2fetc/feedback",
        "/users/%00",
        "/users/a%20b",
        "/users/" + "a" * 65,
        "/static/..%2f..%2fapp%2fmain.py",
        "/static/%2e%2e%2fconfig.py",
    ],
)
def test_path_traversal_in_user_ids(api: Api, path: str) -> None:
    api.create_user("hostile")
    response = api.http.get(path, headers=api.operator)
    if path == "/users/../users":  # the client normalises it to /users: the operator's list
        assert response.status_code == 200
        return
    assert response.status_code in (404, 422), (path, response.text)
    assert_error(response, response.status_code)


@pytest.mark.parametrize("user_id", ["..", ".", "...", "../x", "a/b", "a\\b", "%2e%2e", "", " "])
def test_traversal_user_ids_cannot_be_created(api: Api, user_id: str) -> None:
    response = api.http.post("/users", json={"id": user_id}, headers=api.operator)
    assert_error(response, 422)


@pytest.mark.parametrize("version", ["..", "v1/../../x", "%2e%2e", "v-1", "v99999999999", "v1.0"])
def test_path_traversal_in_adapter_versions(
    api: Api, user: tuple[str, dict[str, str]], version: str
) -> None:
    user_id, auth = user
    response = api.http.post(f"/users/{user_id}/adapters/{version}/activate", headers=auth)
    assert response.status_code in (404, 422), (version, response.text)
    assert_error(response, response.status_code)


@pytest.mark.parametrize(
    "params",
    [
        {"max_tokens": -1},
        {"max_tokens": 0},
        {"max_tokens": 10**12},
        {"temperature": -1},
        {"temperature": 1e308},
        {"top_p": -0.5},
        {"top_p": 2},
        {"temperature": "NaN"},
        {"seed": -(2**70)},
        {"stop": ["x"] * 10_000},
    ],
)
def test_bad_sampling_parameters_are_refused_before_the_model(
    api: Api, user: tuple[str, dict[str, str]], params: dict[str, Any]
) -> None:
    user_id, auth = user
    body = {"prompt": "hi", **params}
    response = api.http.post(f"/users/{user_id}/generate", json=body, headers=auth)
    assert_error(response, 422)
    chat = {"model": f"user:{user_id}", "messages": [{"role": "user", "content": "hi"}], **params}
    if "max_tokens" in params:
        chat["max_completion_tokens"] = params["max_tokens"]
    response = api.http.post("/v1/chat/completions", json=chat, headers=auth)
    assert_error(response, 400)  # OpenAI's dialect under /v1: invalid input is a 400
