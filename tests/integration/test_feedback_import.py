"""JSONL files of preference pairs over real HTTP: `POST /users/<id>/feedback/import` (raw JSONL
body, streamed) and OpenAI's `/v1/files` through the official `openai` client.

Fixtures (tests/fixtures/preference/): `openai_dpo.jsonl` line 1 is the example line of OpenAI's
DPO guide ("Direct preference optimization", data format), line 2 what OpenAI's reference allows
besides (a `developer` turn, content as text parts); `trl_standard.jsonl` and
`trl_conversational.jsonl` are TRL's preference type in its standard and conversational formats
(TRL docs, "Dataset formats and types": line 1 of each is the docs' example), the last
conversational line in TRL's implicit-prompt form.
"""

from __future__ import annotations

import json
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from alembic import command
from sqlalchemy import create_engine, inspect

from app.core.db import alembic_config
from tests.support import Api, LiveServer, assert_error, make_settings, postgres_database

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "preference"
JSONL = {"Content-Type": "application/jsonl"}
GOOD = {"prompt": "Explain recursion.", "chosen": "A function calling itself.", "rejected": "No."}


def _import(api: Api, user: str, headers: dict[str, str], body: Any) -> httpx.Response:
    return api.http.post(
        f"/users/{user}/feedback/import", content=body, headers={**headers, **JSONL}
    )


def _stored(api: Api, user: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    response = api.http.get(f"/users/{user}/feedback", params={"limit": 100}, headers=headers)
    assert response.status_code == 200, response.text
    return list(reversed(response.json()["data"]))  # oldest first: the file's order


def _lines(*pairs: dict[str, Any]) -> bytes:
    return "".join(json.dumps(p) + "\n" for p in pairs).encode()


def test_openai_documented_lines_import(api: Api) -> None:
    user, headers = api.create_user()
    response = _import(api, user, headers, (FIXTURES / "openai_dpo.jsonl").read_bytes())
    assert response.status_code == 201, response.text
    assert (response.json()["pairs"], response.json()["created"]) == (2, 2)
    documented, with_parts = _stored(api, user, headers)
    assert documented["messages"] == [
        {"role": "user", "content": "Hello, can you tell me how cold San Francisco is today?"}
    ]
    assert documented["chosen"].startswith("Today in San Francisco, it is not quite cold")
    assert documented["rejected"] == "It is not particularly cold in San Francisco today."
    assert with_parts["messages"] == [
        {"role": "system", "content": "Answer in one sentence."},
        {"role": "user", "content": "Which planet is known as the Red Planet?"},
    ]
    assert with_parts["chosen"] == "Mars is known as the Red Planet."


def test_post_feedback_takes_openai_documented_line(api: Api) -> None:
    user, headers = api.create_user()
    line = json.loads((FIXTURES / "openai_dpo.jsonl").read_text().splitlines()[0])
    response = api.http.post(f"/users/{user}/feedback", json=line, headers=headers)
    assert response.status_code == 201, response.text
    assert response.json()["pairs"][0]["rejected"].startswith("It is not particularly cold")
    line["input"]["tools"] = [{"type": "function", "function": {"name": "weather"}}]
    refused = api.http.post(f"/users/{user}/feedback", json=line, headers=headers)
    assert assert_error(refused, 422, "tools_unsupported")["param"] == "input.tools"
    assert len(_stored(api, user, headers)) == 1


def test_a_trl_dataset_imports_in_both_forms(api: Api) -> None:
    user, headers = api.create_user()
    for name, count in (("trl_standard.jsonl", 2), ("trl_conversational.jsonl", 3)):
        response = _import(api, user, headers, (FIXTURES / name).read_bytes())
        assert response.status_code == 201, response.text
        assert response.json()["created"] == count
    stored = _stored(api, user, headers)
    assert [(p["messages"][-1]["content"], p["chosen"], p["rejected"]) for p in stored] == [
        ("The sky is", " blue.", " green."),
        ("Water boils at sea level at", " 100 degrees Celsius.", " 50 degrees Celsius."),
        ("What color is the sky?", "It is blue.", "It is green."),
        ("What is 2 + 2?", "4.", "It depends."),
        ("What color is the sky?", "It is blue.", "It is green."),  # the implicit prompt
    ]
    assert stored[3]["messages"][0] == {"role": "system", "content": "Be concise."}


def test_bad_lines_are_reported_by_number_and_nothing_is_stored(api: Api) -> None:
    user, headers = api.create_user()
    identical = {"prompt": "Hi?", "chosen": "Same.", "rejected": " Same.\n"}
    tools = json.loads((FIXTURES / "openai_dpo.jsonl").read_text().splitlines()[0])
    tools["input"]["tools"] = [{"type": "function"}]
    body = _lines(GOOD, GOOD, identical) + b"\n{not json\n" + _lines(GOOD, tools)
    response = _import(api, user, headers, body)
    error = assert_error(response, 400, "invalid_lines")
    assert error["error_count"] == 3
    assert [(e["line"], e["code"]) for e in error["errors"]] == [
        (3, "identical_responses"),
        (5, "invalid_json"),
        (7, "tools_unsupported"),
    ]
    # The same bad pair sent to POST feedback is refused with the same message.
    alone = api.http.post(f"/users/{user}/feedback", json=identical, headers=headers)
    assert error["errors"][0]["message"] == assert_error(alone, 422)["message"]
    assert error["message"].startswith("3 bad line(s); nothing was stored. Line 3: ")
    assert _stored(api, user, headers) == []


def test_errors_are_capped_but_counted(api: Api) -> None:
    user, headers = api.create_user()
    blank_chosen = {**GOOD, "chosen": " "}
    error = assert_error(_import(api, user, headers, _lines(*[blank_chosen] * 70)), 400)
    assert (len(error["errors"]), error["error_count"]) == (50, 70)
    assert error["errors"][49] == {
        "line": 50,
        "message": "chosen: must not be empty",
        "code": "empty_text",
        "param": "chosen",
    }
    assert_error(_import(api, user, headers, b"\n \n"), 400, "empty_file")
    too_long = _lines(GOOD) + b'{"prompt": "' + b"x" * 1_100_000 + b'"}\n'  # > MAX_BODY_BYTES
    error = assert_error(_import(api, user, headers, too_long), 400)
    assert [(e["line"], e["code"]) for e in error["errors"]] == [(2, "line_too_long")]
    assert _stored(api, user, headers) == []


def test_the_same_file_imports_once_per_user(api: Api) -> None:
    user, headers = api.create_user()
    body = (FIXTURES / "trl_conversational.jsonl").read_bytes()
    first = _import(api, user, headers, body)
    assert first.status_code == 201, first.text
    again = _import(api, user, headers, body)
    assert again.status_code == 200, again.text
    assert again.json() == {**first.json(), "created": 0, "already_imported": True}
    assert len(_stored(api, user, headers)) == 3
    other, other_headers = api.create_user()  # another user's import of it is theirs
    assert _import(api, other, other_headers, body).status_code == 201
    assert _import(api, user, headers, body + b"\n").json()["created"] == 3  # other bytes


def test_wrong_content_type_and_other_users_are_refused(api: Api) -> None:
    user, headers = api.create_user()
    _, other = api.create_user()
    form = api.http.post(
        f"/users/{user}/feedback/import", files={"file": ("a.jsonl", _lines(GOOD))}, headers=headers
    )
    assert "POST /v1/files" in assert_error(form, 415, "unsupported_media_type")["message"]
    assert_error(_import(api, user, other, _lines(GOOD)), 403, "wrong_user")
    assert_error(_import(api, "nobody", api.operator, _lines(GOOD)), 404, "user_not_found")
    assert _stored(api, user, headers) == []


def _big_file(path: Path, lines: int) -> int:
    """`lines` distinct pairs of about 1.5 kB each; returns the file's size."""
    with path.open("w") as out:
        for i in range(lines):
            pair = {"prompt": f"Question {i}: " + "why " * 100, "chosen": "Because. " * 60}
            out.write(json.dumps({**pair, "rejected": f"No idea ({i})."}) + "\n")
    return path.stat().st_size


def test_a_10000_line_file_streams_in_bounded_memory(api: Api, tmp_path: Path) -> None:
    """tracemalloc counts every Python allocation of this process, which runs the server too
    (uvicorn in a thread) and the client, which streams the file from disk in 64 kB pieces.
    The peak stays under 4 MB for a 10 MB file: what is held at once is one chunk, one line and
    one batch of rows (≤ 500 pairs or 256 kB of lines), not the file."""
    user, headers = api.create_user()
    path = tmp_path / "big.jsonl"
    size = _big_file(path, 10_000)
    assert size > 10_000_000
    tracemalloc.start()
    try:
        with path.open("rb") as body:
            response = _import(api, user, headers, body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status_code == 201, response.text
    assert response.json()["created"] == 10_000
    assert peak < 4_000_000, peak
    assert api.http.get(f"/users/{user}", headers=headers).json()["pair_count"] == 10_000


def test_openai_client_uploads_lists_reads_and_deletes_files(
    api: Api, live_server: LiveServer, tmp_path: Path
) -> None:
    user, headers = api.create_user()
    client = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=headers["Authorization"][7:])
    path = FIXTURES / "openai_dpo.jsonl"
    with path.open("rb") as handle:
        created = client.files.create(file=handle, purpose="fine-tune")
    assert created.id.startswith("file-") and created.object == "file"
    assert (created.bytes, created.filename, created.purpose, created.status) == (
        path.stat().st_size,
        "openai_dpo.jsonl",
        "fine-tune",
        "processed",
    )
    assert client.files.retrieve(created.id) == created
    assert [f.id for f in client.files.list()] == [created.id]
    imported = api.http.post(
        f"/users/{user}/feedback/import", params={"file_id": created.id}, headers=headers
    )
    assert imported.status_code == 201, imported.text
    assert (imported.json()["created"], imported.json()["file_id"]) == (2, created.id)
    again = api.http.post(
        f"/users/{user}/feedback/import", params={"file_id": created.id}, headers=headers
    )
    assert (again.status_code, again.json()["created"]) == (200, 0)
    deleted = client.files.delete(created.id)
    assert (deleted.id, deleted.deleted) == (created.id, True)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)
    assert len(_stored(api, user, headers)) == 2  # imported pairs outlive the file


def test_a_bad_file_is_refused_at_upload_and_files_are_private(
    api: Api, live_server: LiveServer
) -> None:
    user, headers = api.create_user()
    _, other_headers = api.create_user()
    key = headers["Authorization"][7:]
    client = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=("bad.jsonl", _lines(GOOD, {**GOOD, "rejected": GOOD["chosen"]})),
                            purpose="fine-tune")  # fmt: skip
    body = refused.value.body
    assert isinstance(body, dict) and body["code"] == "invalid_lines", body
    assert body["errors"][0]["line"] == 2
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("a.jsonl", _lines(GOOD)), purpose="batch")
    assert list(client.files.list()) == []
    theirs = openai.OpenAI(
        base_url=f"{live_server.url}/v1", api_key=other_headers["Authorization"][7:]
    ).files.create(file=("theirs.jsonl", _lines(GOOD)), purpose="fine-tune")
    operators = openai.OpenAI(
        base_url=f"{live_server.url}/v1", api_key=api.operator["Authorization"][7:]
    )
    own = operators.files.create(file=("shared.jsonl", _lines(GOOD)), purpose="fine-tune")
    with pytest.raises(openai.PermissionDeniedError):
        client.files.retrieve(theirs.id)
    with pytest.raises(openai.PermissionDeniedError):
        client.files.delete(own.id)
    assert {f.id for f in operators.files.list()} == {theirs.id, own.id}
    forbidden = api.http.post(
        f"/users/{user}/feedback/import", params={"file_id": own.id}, headers=headers
    )
    assert_error(forbidden, 403, "wrong_owner")
    by_operator = api.http.post(  # the operator's own file, imported into a user by the operator
        f"/users/{user}/feedback/import", params={"file_id": own.id}, headers=api.operator
    )
    assert by_operator.status_code == 201, by_operator.text
    assert len(_stored(api, user, headers)) == 1


@pytest.fixture(scope="module")
def small_upload_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A server on its own Postgres database whose uploads may be at most 64 kB."""
    with postgres_database() as url:
        settings = make_settings(tmp_path_factory.mktemp("small"), url, max_upload_bytes=65536)
        server = LiveServer(settings).start()
        yield server
        server.stop()


def test_an_upload_over_the_limit_is_refused_while_it_streams(
    small_upload_server: LiveServer,
) -> None:
    api = Api(small_upload_server.url)
    try:
        user, headers = api.create_user()

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is found while reading
            for _ in range(1000):  # about 90 kB
                yield _lines(GOOD)

        response = _import(api, user, headers, chunks())
        assert_error(response, 413, "payload_too_large")
        with_length = _import(api, user, headers, b"".join(chunks()))
        assert_error(with_length, 413, "payload_too_large")
        files = api.http.post(
            "/v1/files",
            files={"file": ("big.jsonl", b"".join(chunks()))},
            data={"purpose": "fine-tune"},
            headers=headers,
        )
        assert_error(files, 413, "payload_too_large")
        assert _stored(api, user, headers) == []
        assert api.http.get("/v1/files", headers=headers).json()["data"] == []
    finally:
        api.close()
        small_upload_server.wipe()


def test_concurrent_imports_of_one_file_store_it_once(api: Api, tmp_path: Path) -> None:
    user, headers = api.create_user()
    path = tmp_path / "pairs.jsonl"
    _big_file(path, 2000)
    results: list[httpx.Response] = []

    def send() -> None:
        with httpx.Client(base_url=str(api.http.base_url), timeout=120) as http:
            body = path.read_bytes()
            results.append(
                http.post(
                    f"/users/{user}/feedback/import", content=body, headers={**headers, **JSONL}
                )
            )

    threads = [threading.Thread(target=send) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.status_code for r in results) == [200, 201], [r.text for r in results]
    assert api.http.get(f"/users/{user}", headers=headers).json()["pair_count"] == 2000


def test_migration_0009_goes_down_and_up() -> None:
    with postgres_database() as url:
        config = alembic_config(url)
        command.downgrade(config, "0008")
        engine = create_engine(url)
        assert not {"files", "file_chunks", "feedback_imports"} & set(
            inspect(engine).get_table_names()
        )
        command.upgrade(config, "head")
        assert {"files", "file_chunks", "feedback_imports"} <= set(
            inspect(engine).get_table_names()
        )
        engine.dispose()
