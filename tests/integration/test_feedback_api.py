"""Preference feedback over real HTTP: shapes, bad input, idempotency, paging, deletion."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from sqlalchemy import event, text

from app.api.state import app_state
from app.core.db import transaction
from app.core.errors import NotFound
from app.schemas.feedback import PairIn
from app.services import feedback as feedback_service
from tests.support import Api, LiveServer, assert_error

PAIR = {"prompt": "Explain recursion.", "chosen": "A function calling itself.", "rejected": "No."}


def _pairs(api: Api, user: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    response = api.http.get(f"/users/{user}/feedback", params={"limit": 100}, headers=headers)
    assert response.status_code == 200
    return list(response.json()["data"])


def test_single_pair_is_stored_and_returned(api: Api) -> None:
    _, alice = api.create_user("alice")
    response = api.http.post(
        "/users/alice/feedback", json={**PAIR, "metadata": {"src": "t"}}, headers=alice
    )
    assert response.status_code == 201
    body = response.json()
    assert body["created"] == 1
    stored = body["pairs"][0]
    assert stored["messages"] == [{"role": "user", "content": "Explain recursion."}]
    assert (stored["chosen"], stored["rejected"], stored["metadata"]) == (
        PAIR["chosen"],
        PAIR["rejected"],
        {"src": "t"},
    )
    assert _pairs(api, "alice", alice)[0]["id"] == stored["id"]


def test_messages_batch_and_openai_shape(api: Api) -> None:
    _, alice = api.create_user("alice")
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye?"},
    ]
    openai_pair = {
        "input": {"messages": [{"role": "user", "content": "Q?"}]},
        "preferred_output": [{"role": "assistant", "content": "Good"}],
        "non_preferred_output": [{"role": "assistant", "content": "Bad"}],
    }
    batch = {
        "pairs": [{"messages": chat, "chosen": "Bye!", "rejected": "Whatever."}, openai_pair, PAIR]
    }
    response = api.http.post("/users/alice/feedback", json=batch, headers=alice)
    assert response.status_code == 201, response.text
    assert response.json()["created"] == 3
    assert (
        api.http.post("/users/alice/feedback", json=openai_pair, headers=alice).status_code == 201
    )
    stored = _pairs(api, "alice", alice)
    assert len(stored) == 4
    assert stored[0]["chosen"] == "Good" and stored[0]["rejected"] == "Bad"
    assert stored[3]["messages"] == chat


BAD_BODIES: list[tuple[str, Any, int, str | None]] = [
    ("empty prompt", {**PAIR, "prompt": ""}, 422, "empty_text"),
    ("whitespace chosen", {**PAIR, "chosen": "  \n\t"}, 422, "empty_text"),
    ("whitespace rejected", {**PAIR, "rejected": " "}, 422, "empty_text"),
    ("identical", {**PAIR, "rejected": PAIR["chosen"]}, 422, "identical_responses"),
    (
        "identical modulo spaces",
        {**PAIR, "rejected": PAIR["chosen"] + "  "},
        422,
        "identical_responses",
    ),
    ("too long", {**PAIR, "chosen": "x" * 8001}, 422, "text_too_long"),
    (
        "both prompt and messages",
        {**PAIR, "messages": [{"role": "user", "content": "hi"}]},
        422,
        "validation_error",
    ),
    ("neither prompt nor messages", {"chosen": "a", "rejected": "b"}, 422, "validation_error"),
    (
        "last turn not user",
        {
            "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            "chosen": "x",
            "rejected": "y",
        },
        422,
        "last_turn_not_user",
    ),
    ("empty messages", {"messages": [], "chosen": "x", "rejected": "y"}, 422, "empty_messages"),
    (
        "bad role",
        {"messages": [{"role": "robot", "content": "a"}], "chosen": "x", "rejected": "y"},
        422,
        "validation_error",
    ),
    ("unknown field", {**PAIR, "score": 1}, 422, "validation_error"),
    (
        "unknown nested field",
        {
            "messages": [{"role": "user", "content": "a", "name": "x"}],
            "chosen": "x",
            "rejected": "y",
        },
        422,
        "validation_error",
    ),
    ("missing chosen", {"prompt": "p", "rejected": "r"}, 422, "validation_error"),
    ("wrong type", {**PAIR, "chosen": 5}, 422, "validation_error"),
    ("NUL character", {**PAIR, "chosen": "a\x00b"}, 422, "invalid_text"),
    ("empty batch", {"pairs": []}, 422, "validation_error"),
    ("batch with a bad pair", {"pairs": [PAIR, {**PAIR, "chosen": ""}]}, 422, "empty_text"),
    ("batch over the limit", {"pairs": [PAIR] * 101}, 422, "batch_too_large"),
    (
        "openai wrong role",
        {
            "input": {"messages": [{"role": "user", "content": "q"}]},
            "preferred_output": [{"role": "user", "content": "a"}],
            "non_preferred_output": [{"role": "assistant", "content": "b"}],
        },
        422,
        "invalid_role",
    ),
    (
        "openai identical",
        {
            "input": {"messages": [{"role": "user", "content": "q"}]},
            "preferred_output": [{"role": "assistant", "content": "a"}],
            "non_preferred_output": [{"role": "assistant", "content": "a"}],
        },
        422,
        "identical_responses",
    ),
    ("a list", [PAIR], 422, "validation_error"),
    ("metadata too large", {**PAIR, "metadata": {"x": "y" * 5000}}, 422, "metadata_too_large"),
]


@pytest.mark.parametrize(
    ("name", "body", "status", "code"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES]
)
def test_bad_feedback_is_refused_and_stores_nothing(
    api: Api, name: str, body: Any, status: int, code: str | None
) -> None:
    _, alice = api.create_user("alice")
    error = assert_error(
        api.http.post("/users/alice/feedback", json=body, headers=alice), status, code
    )
    assert error["type"] == "invalid_request_error"
    assert _pairs(api, "alice", alice) == []


def test_bad_field_is_named(api: Api) -> None:
    _, alice = api.create_user("alice")
    error = assert_error(
        api.http.post(
            "/users/alice/feedback", json={"pairs": [PAIR, {**PAIR, "rejected": ""}]}, headers=alice
        ),
        422,
    )
    assert error["param"] == "pairs.1.rejected" and "pairs.1.rejected" in error["message"]
    error = assert_error(
        api.http.post("/users/alice/feedback", json={**PAIR, "chosen": 5}, headers=alice), 422
    )
    assert error["param"] == "chosen"


def test_malformed_json_and_oversize_body(api: Api) -> None:
    _, alice = api.create_user("alice")
    headers = {**alice, "Content-Type": "application/json"}
    assert_error(
        api.http.post("/users/alice/feedback", content=b'{"prompt": ', headers=headers),
        400,
        "invalid_json",
    )
    assert_error(
        api.http.post("/users/alice/feedback", content=b"\xff\xfe{}", headers=headers),
        400,
        "invalid_json",
    )
    huge = {**PAIR, "chosen": "x" * 1_100_000}
    assert_error(
        api.http.post("/users/alice/feedback", json=huge, headers=alice), 413, "payload_too_large"
    )

    def chunks():  # no Content-Length: the limit must hold for streamed bodies too
        yield b'{"prompt": "p", "chosen": "'
        for _ in range(200):
            yield b"x" * 10_000
        yield b'", "rejected": "r"}'

    assert_error(api.http.post("/users/alice/feedback", content=chunks(), headers=headers), 413)
    assert _pairs(api, "alice", alice) == []


def test_the_key_is_checked_before_the_body_and_the_body_must_be_json(api: Api) -> None:
    """The route validates its body itself (after the key, as a dependency-checked key was):
    no key or another user's key is refused whatever the body; a non-JSON type is a 415."""
    _, alice = api.create_user("alice")
    _, bob = api.create_user("bob")
    for kind in ("application/json", "text/plain"):
        for headers, status in (({}, 401), ({"Authorization": "Bearer bapo_x"}, 401), (bob, 403)):
            response = api.http.post(
                "/users/alice/feedback",
                content=b'{"prompt": ',
                headers={**headers, "Content-Type": kind},
            )
            assert_error(response, status)
    plain = {**alice, "Content-Type": "text/plain"}
    refused = api.http.post("/users/alice/feedback", content=b'{"prompt": "p"}', headers=plain)
    assert assert_error(refused, 415, "unsupported_media_type")["param"] == "Content-Type"
    typed = {**alice, "Content-Type": "application/json; charset=utf-8"}
    assert api.http.post("/users/alice/feedback", json=PAIR, headers=typed).status_code == 201
    assert len(_pairs(api, "alice", alice)) == 1


def test_openapi_documents_the_feedback_body(api: Api) -> None:
    spec = api.http.get("/openapi.json").json()
    body = spec["paths"]["/users/{user_id}/feedback"]["post"]["requestBody"]
    shapes = body["content"]["application/json"]["schema"]["oneOf"]
    names = [shape["$ref"].rsplit("/", 1)[1] for shape in shapes]
    assert names == ["PairIn", "OpenAIPreferenceIn", "PairBatchIn"]
    for name in names:
        assert "properties" in spec["components"]["schemas"][name], name
    assert set(body["content"]["application/json"]["examples"]) == {"pair", "batch", "openai"}


def test_texts_at_the_limit_are_accepted(api: Api) -> None:
    _, alice = api.create_user("alice")
    body = {"prompt": "p" * 8000, "chosen": "c" * 8000, "rejected": "r" * 8000}
    assert api.http.post("/users/alice/feedback", json=body, headers=alice).status_code == 201


def test_payloads_are_stored_verbatim(api: Api) -> None:
    _, alice = api.create_user("alice")
    text = "'; DROP TABLE users; -- <script>alert(1)</script> \u2028 emoji \U0001f600"
    response = api.http.post("/users/alice/feedback", json={**PAIR, "chosen": text}, headers=alice)
    assert response.status_code == 201
    assert _pairs(api, "alice", alice)[0]["chosen"] == text


def test_idempotency_key_replays_and_stores_once(api: Api) -> None:
    _, alice = api.create_user("alice")
    headers = {**alice, "Idempotency-Key": "req-1"}
    first = api.http.post("/users/alice/feedback", json={"pairs": [PAIR, PAIR]}, headers=headers)
    again = api.http.post("/users/alice/feedback", json={"pairs": [PAIR, PAIR]}, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert len(_pairs(api, "alice", alice)) == 2
    other = api.http.post("/users/alice/feedback", json=PAIR, headers=headers)
    assert_error(other, 409, "idempotency_key_reused")
    new_key = api.http.post(
        "/users/alice/feedback", json=PAIR, headers={**alice, "Idempotency-Key": "req-2"}
    )
    assert new_key.status_code == 201
    assert len(_pairs(api, "alice", alice)) == 3


def test_idempotency_keys_are_per_user(api: Api) -> None:
    _, alice = api.create_user("alice")
    _, bob = api.create_user("bob")
    for user, headers in (("alice", alice), ("bob", bob)):
        response = api.http.post(
            f"/users/{user}/feedback", json=PAIR, headers={**headers, "Idempotency-Key": "same"}
        )
        assert response.status_code == 201 and "idempotent-replayed" not in response.headers
    assert len(_pairs(api, "bob", bob)) == 1


def test_concurrent_retries_store_once(api: Api, live_server: LiveServer) -> None:
    """16 clients send the same key and batch at once: one claims the key and stores the batch,
    the others wait for its commit and replay it; every answer is the same 201."""
    _, alice = api.create_user("alice")
    headers = {**alice, "Idempotency-Key": "race"}
    batch = {"pairs": [{**PAIR, "chosen": f"answer {i}"} for i in range(3)]}
    start = threading.Barrier(16)

    def post(_: int) -> httpx.Response:
        with httpx.Client(base_url=live_server.url, timeout=60) as client:
            start.wait()
            return client.post("/users/alice/feedback", json=batch, headers=headers)

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(post, range(16)))
    assert [r.status_code for r in responses] == [201] * 16
    assert all(r.json() == responses[0].json() for r in responses)
    replayed = [r.headers.get("idempotent-replayed") for r in responses]
    assert replayed.count(None) == 1 and replayed.count("true") == 15
    stored = _pairs(api, "alice", alice)
    assert sorted(p["id"] for p in stored) == [p["id"] for p in responses[0].json()["pairs"]]
    assert _count(live_server, "idempotency_records") == 1


def test_unknown_user_is_404_and_stores_nothing(api: Api, live_server: LiveServer) -> None:
    for headers in (api.operator, {**api.operator, "Idempotency-Key": "k"}):
        response = api.http.post("/users/nobody/feedback", json=PAIR, headers=headers)
        assert_error(response, 404, "user_not_found")
    # A user deleted while a request is under way fails the inserts on the foreign key: the
    # service answers the same 404 (the request's own key proved the user a moment earlier).
    factory = app_state(live_server.app).session_factory
    pair = feedback_service.normalize(PairIn.model_validate(PAIR), live_server.settings)
    for key in (None, "k"):
        with pytest.raises(NotFound) as caught, transaction(factory) as session:
            feedback_service.store_pairs(session, "gone", pair, key)
        assert caught.value.code == "user_not_found"
    assert _count(live_server, "preference_pairs") == 0
    assert _count(live_server, "idempotency_records") == 0


def test_a_post_takes_four_statements(api: Api, live_server: LiveServer) -> None:
    """Key lookup, claim (INSERT ... ON CONFLICT DO NOTHING), one INSERT of the batch, the
    response saved into the claim; a replay: key lookup, claim, read."""
    _, alice = api.create_user("alice")
    api.http.post("/users/alice/feedback", json=PAIR, headers=alice)  # records the key's use
    headers = {**alice, "Idempotency-Key": "counted"}
    size = 1 if live_server.settings.is_sqlite else 5  # SQLite inserts row by row
    batch = {"pairs": [{**PAIR, "chosen": f"answer {i}"} for i in range(size)]}
    with _statements(live_server) as first:
        created = api.http.post("/users/alice/feedback", json=batch, headers=headers)
    assert created.status_code == 201 and created.json()["created"] == size
    assert [s.split()[0] for s in first] == ["SELECT", "INSERT", "INSERT", "UPDATE"], first
    assert "ON CONFLICT" in first[1] and "SAVEPOINT" not in " ".join(first)
    with _statements(live_server) as again:
        replay = api.http.post("/users/alice/feedback", json=batch, headers=headers)
    assert replay.headers["idempotent-replayed"] == "true"
    assert [s.split()[0] for s in again] == ["SELECT", "INSERT", "SELECT"], again
    with _statements(live_server) as plain:
        api.http.post("/users/alice/feedback", json=batch, headers=alice)
    assert [s.split()[0] for s in plain] == ["SELECT", "INSERT"], plain
    assert len(_pairs(api, "alice", alice)) == 1 + 2 * size


def _count(server: LiveServer, table: str) -> int:
    with app_state(server.app).engine.connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


@contextmanager
def _statements(server: LiveServer) -> Iterator[list[str]]:
    """The SQL statements the server's engine sends meanwhile (pool pings are not statements)."""
    seen: list[str] = []
    engine = app_state(server.app).engine

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement.strip())

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_pagination_newest_first(api: Api) -> None:
    _, alice = api.create_user("alice")
    batch = {"pairs": [{**PAIR, "chosen": f"answer {i}"} for i in range(7)]}
    api.http.post("/users/alice/feedback", json=batch, headers=alice)
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = api.http.get("/users/alice/feedback", params=params, headers=alice).json()
        seen += [p["chosen"] for p in page["data"]]
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        cursor = page["next_cursor"]
    assert seen == [f"answer {i}" for i in reversed(range(7))]
    assert_error(
        api.http.get("/users/alice/feedback", params={"cursor": "abc"}, headers=alice),
        400,
        "invalid_cursor",
    )
    assert_error(api.http.get("/users/alice/feedback", params={"limit": 0}, headers=alice), 422)


def test_delete_pair(api: Api) -> None:
    _, alice = api.create_user("alice")
    _, bob = api.create_user("bob")
    pair_id = api.http.post("/users/alice/feedback", json=PAIR, headers=alice).json()["pairs"][0][
        "id"
    ]
    bob_pair = api.http.post("/users/bob/feedback", json=PAIR, headers=bob).json()["pairs"][0]["id"]
    assert_error(
        api.http.delete(f"/users/alice/feedback/{bob_pair}", headers=alice), 404, "pair_not_found"
    )
    assert api.http.delete(f"/users/alice/feedback/{pair_id}", headers=alice).status_code == 204
    assert _pairs(api, "alice", alice) == []
    assert_error(api.http.delete(f"/users/alice/feedback/{pair_id}", headers=alice), 404)
    assert len(_pairs(api, "bob", bob)) == 1
