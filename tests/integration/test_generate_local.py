"""Generation through the live server with the in-process (transformers + PEFT) backend.

Real components throughout: the bundled model, real PEFT adapters, the real app on uvicorn with
its SQLite database (the embedded configuration this backend is for).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.api.state import app_state
from tests.integration.generation_support import (
    MAX_TOKENS,
    MESSAGES,
    PROMPT,
    build_adapters,
    check_chunks,
    forget_reference_model,
    generate,
    generated,
    model_dir,
    new_user,
    one_torch_thread,
    publish,
    reference_greedy,
    sse_events,
)
from tests.support import Api, LiveServer, assert_error, make_settings

pytestmark = pytest.mark.slow
SEEDS = [2, 3, 4, 5]
MAX_NEW_TOKENS = 32
MAX_PROMPT_TOKENS = 200


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """In-process generation on one torch thread for this module (restored afterwards)."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The app with the local backend on the bundled model; an LRU of two adapters."""
    settings = make_settings(
        tmp_path_factory.mktemp("local-data"),
        base_model=str(model_dir()),
        inference_backend="local",
        local_max_adapters=2,
        local_threads=1,  # the test machine is shared: one thread decodes faster there
        max_new_tokens=MAX_NEW_TOKENS,
        max_prompt_tokens=MAX_PROMPT_TOKENS,
    )
    live = LiveServer(settings).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Four PEFT adapters, each changing the greedy answer differently."""
    return build_adapters(tmp_path_factory.mktemp("adapters"), SEEDS)


@pytest.fixture(scope="module")
def expected(adapters: dict[int, Path]) -> dict[int | None, str]:
    """Reference greedy answers (plain transformers + PEFT), keyed by seed; None = base."""
    texts: dict[int | None, str] = {None: reference_greedy(None)}
    texts.update({seed: reference_greedy(path) for seed, path in adapters.items()})
    forget_reference_model()
    assert len(set(texts.values())) == len(texts), f"adapters must differ: {texts}"
    return texts


@pytest.fixture
def api(server: LiveServer) -> Iterator[Api]:
    """A client of this module's server (users get fresh ids, so nothing needs wiping)."""
    client = Api(server.url)
    yield client
    client.close()


def test_no_adapter_serves_the_base_model(api: Api, expected: dict[int | None, str]) -> None:
    user_id, headers = new_user(api)
    data = generated(api, user_id, headers)
    assert data["text"] == expected[None]
    assert data["adapter_version"] is None and data["model"] == f"user:{user_id}:base"
    assert data["usage"] == {"prompt_tokens": 37, "completion_tokens": 8, "total_tokens": 45}
    assert data["finish_reason"] == "stop"  # the base model ends its answer by itself


def test_publish_activate_and_roll_back(
    server: LiveServer, api: Api, adapters: dict[int, Path], expected: dict[int | None, str]
) -> None:
    user_id, headers = new_user(api)
    assert publish(server, user_id, adapters[2]) == 1
    data = generated(api, user_id, headers)
    assert (data["adapter_version"], data["text"]) == (1, expected[2])
    assert data["text"] != expected[None]

    assert publish(server, user_id, adapters[3]) == 2  # the next request uses v2, no restart
    assert generated(api, user_id, headers)["text"] == expected[3]

    listing = api.http.post(f"/users/{user_id}/adapters/v1/activate", headers=headers)
    assert listing.status_code == 200, listing.text
    assert listing.json()["active_version"] == 1
    data = generated(api, user_id, headers)
    assert (data["adapter_version"], data["text"]) == (1, expected[2])
    assert generated(api, user_id, headers, adapter="v2")["text"] == expected[3]
    assert generated(api, user_id, headers, adapter="base")["text"] == expected[None]


def test_gate_failure_publishes_without_activating(
    server: LiveServer, api: Api, adapters: dict[int, Path], expected: dict[int | None, str]
) -> None:
    user_id, headers = new_user(api)
    publish(server, user_id, adapters[2], gate_passed=False)
    assert generated(api, user_id, headers)["adapter_version"] is None
    assert generated(api, user_id, headers, adapter="v1")["text"] == expected[2]


def test_lru_eviction_still_serves_every_adapter(
    server: LiveServer, api: Api, adapters: dict[int, Path], expected: dict[int | None, str]
) -> None:
    users = {}
    for seed in SEEDS[:3]:  # three adapters through an LRU of two
        user_id, headers = new_user(api)
        publish(server, user_id, adapters[seed])
        users[seed] = (user_id, headers)
    for seed in SEEDS[:3] * 2:
        user_id, headers = users[seed]
        assert generated(api, user_id, headers)["text"] == expected[seed], seed
        assert len(loaded_adapters(server)) <= 2
    assert generated(api, *users[SEEDS[0]], adapter="base")["text"] == expected[None]


def test_concurrent_requests_get_their_own_adapter(
    server: LiveServer, api: Api, adapters: dict[int, Path], expected: dict[int | None, str]
) -> None:
    users: list[tuple[int | None, str, dict[str, str]]] = []
    for seed in SEEDS:
        user_id, headers = new_user(api)
        publish(server, user_id, adapters[seed])
        users.append((seed, user_id, headers))
    users.append((None, *new_user(api)))  # and one on the base model

    async def one(client: httpx.AsyncClient, user_id: str, headers: dict[str, str]) -> str:
        body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
        response = await client.post(f"/users/{user_id}/generate", json=body, headers=headers)
        assert response.status_code == 200, response.text
        return str(response.json()["text"])

    async def run_all() -> list[str]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            calls = [one(client, u, h) for _seed, u, h in users * 2]
            return await asyncio.gather(*calls)

    texts = asyncio.run(run_all())
    assert texts == [expected[seed] for seed, _u, _h in users * 2]


def test_stream_concatenates_to_the_greedy_text(
    server: LiveServer, api: Api, adapters: dict[int, Path], expected: dict[int | None, str]
) -> None:
    user_id, headers = new_user(api)
    publish(server, user_id, adapters[4])
    response = generate(api, user_id, headers, stream=True)
    assert response.status_code == 200, response.text
    events = sse_events(response)
    text, finish = check_chunks(events, usage=True)
    assert text == expected[4] == generated(api, user_id, headers)["text"]
    assert finish == "length" and events[0]["adapter_version"] == 1
    assert events[-2]["usage"]["completion_tokens"] == MAX_TOKENS

    body = {
        "model": f"user:{user_id}",
        "messages": MESSAGES,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
    }
    response = api.http.post("/v1/chat/completions", json=body, headers=headers)
    text, finish = check_chunks(sse_events(response), usage=False)
    assert (text, finish) == (expected[4], "length")


def test_stop_strings_cut_the_text_in_both_modes(api: Api, expected: dict[int | None, str]) -> None:
    user_id, headers = new_user(api)
    base = expected[None]
    cut = base.index("Paris")
    data = generated(api, user_id, headers, stop=["Paris", "zzz"])
    assert (data["text"], data["finish_reason"]) == (base[:cut], "stop")
    events = sse_events(generate(api, user_id, headers, stop="Paris", stream=True))
    assert check_chunks(events, usage=True) == (base[:cut], "stop")


def test_seeded_sampling_repeats(api: Api) -> None:
    user_id, headers = new_user(api)
    first = generated(api, user_id, headers, temperature=0.9, top_p=0.9, seed=7)
    again = generated(api, user_id, headers, temperature=0.9, top_p=0.9, seed=7)
    assert first["text"] == again["text"]


def test_openai_surface(
    server: LiveServer, api: Api, adapters: dict[int, Path], expected: dict[int | None, str]
) -> None:
    user_id, headers = new_user(api)
    publish(server, user_id, adapters[5])
    body = {
        "model": f"user:{user_id}",
        "messages": MESSAGES,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "frequency_penalty": 0,
    }
    response = api.http.post("/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    assert data["model"] == f"user:{user_id}:v1"
    assert data["choices"][0]["message"] == {"role": "assistant", "content": expected[5]}
    assert data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + MAX_TOKENS

    body["model"] = f"user:{user_id}:base"
    response = api.http.post("/v1/chat/completions", json=body, headers=api.operator)
    assert response.json()["choices"][0]["message"]["content"] == expected[None]

    ids = [m["id"] for m in api.http.get("/v1/models", headers=headers).json()["data"]]
    assert ids == [f"user:{user_id}", f"user:{user_id}:base", f"user:{user_id}:v1"]
    operator_ids = [
        m["id"] for m in api.http.get("/v1/models", headers=api.operator).json()["data"]
    ]
    assert f"user:{user_id}" in operator_ids and len(operator_ids) > 1


def test_a_key_cannot_generate_as_another_user(api: Api) -> None:
    alice, alice_headers = new_user(api)
    bob, _ = new_user(api)
    assert_error(generate(api, bob, alice_headers), 403, "wrong_user")
    body = {"model": f"user:{bob}", "messages": MESSAGES, "max_tokens": 4}
    assert_error(
        api.http.post("/v1/chat/completions", json=body, headers=alice_headers), 403, "wrong_user"
    )
    assert_error(api.http.post("/v1/chat/completions", json=body), 401)
    assert_error(generate(api, alice, {}), 401)
    assert_error(generate(api, "nobody", api.operator), 404, "user_not_found")
    body["model"] = "user:nobody"
    assert_error(
        api.http.post("/v1/chat/completions", json=body, headers=api.operator),
        404,
        "user_not_found",
    )


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"max_tokens": MAX_NEW_TOKENS + 1}, 422, "max_tokens_too_large"),
        ({"prompt": "word " * 400}, 422, "prompt_too_long"),
        ({"adapter": "v9"}, 404, "adapter_not_found"),
        ({"adapter": "latest"}, 422, "validation_error"),
        ({"prompt": None, "messages": []}, 422, "validation_error"),
        ({"messages": MESSAGES}, 422, "validation_error"),  # prompt and messages together
        ({"temperature": 2.5}, 422, "validation_error"),
        ({"top_p": 0}, 422, "validation_error"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 422, "validation_error"),
        ({"max_tokens": 0}, 422, "validation_error"),
    ],
)
def test_bad_input_is_refused_before_the_backend(
    api: Api, body: dict[str, object], status: int, code: str
) -> None:
    user_id, headers = new_user(api)
    assert_error(generate(api, user_id, headers, **body), status, code)


def test_openai_bad_input(api: Api) -> None:
    user_id, headers = new_user(api)
    cases: list[tuple[dict[str, object], int, str]] = [
        ({"model": "gpt-4o"}, 404, "model_not_found"),
        ({"model": f"user:{user_id}:v3"}, 404, "adapter_not_found"),
        # OpenAI's dialect under /v1: invalid input is 400, with the field in `param`
        ({"max_tokens": MAX_NEW_TOKENS + 1}, 400, "max_tokens_too_large"),
        ({"messages": []}, 400, "validation_error"),
        ({"n": 9}, 400, "validation_error"),
        (
            {"messages": [{"role": "user", "content": "word " * 400}]},
            400,
            "context_length_exceeded",
        ),
        ({"logit_bias": {"999999": 5}}, 400, "invalid_logit_bias"),
        ({"stream": True, "logprobs": True}, 400, "unsupported"),
        ({"store": True}, 400, "validation_error"),  # not ours to honour: refused, not dropped
    ]
    for change, status, code in cases:
        body = {"model": f"user:{user_id}", "messages": MESSAGES, "max_tokens": 4, **change}
        response = api.http.post("/v1/chat/completions", json=body, headers=headers)
        assert_error(response, status, code)


def test_deleting_a_user_unloads_their_adapters(
    server: LiveServer, api: Api, adapters: dict[int, Path]
) -> None:
    user_id, headers = new_user(api)
    publish(server, user_id, adapters[2])
    generated(api, user_id, headers)
    assert f"user-{user_id}-v1" in loaded_adapters(server)
    assert api.http.delete(f"/users/{user_id}", headers=api.operator).status_code == 204
    deadline = time.monotonic() + 10
    while f"user-{user_id}-v1" in loaded_adapters(server):
        assert time.monotonic() < deadline, "adapter still loaded after the user was deleted"
        time.sleep(0.05)


def test_readyz_reports_the_inference_backend(api: Api) -> None:
    checks = api.http.get("/readyz").json()["checks"]
    assert checks["inference"]["ok"] is True, checks
    assert checks["inference"]["detail"].startswith("local:")


def loaded_adapters(server: LiveServer) -> set[str]:
    """What the server's in-process backend holds (white-box look at the real backend)."""
    engine = app_state(server.app).inference._engine
    return set(engine.adapters) if engine is not None else set()
