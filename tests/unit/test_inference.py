"""Pure pieces of the serving path: stop strings, model ids, request shapes, prompt token counts."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from app.core.errors import InvalidRequest, NotFound
from app.inference.local import StopTrimmer, first_stop
from app.inference.tokens import PromptTokenCounter, estimate_tokens
from app.inference.vllm import VllmReplica
from app.schemas.generate import ChatCompletionIn, GenerateIn
from app.services.adapters import name_pattern, parse_selector
from app.services.generate import parse_model_id

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "héllo wörld 😀 " * 20},
        {"role": "assistant", "content": "Hi.\n\n  Indented  text"},
        {"role": "user", "content": "<|im_start|> is a special token written as text"},
    ],
]


def trimmed(pieces: list[str], stops: tuple[str, ...]) -> tuple[list[str], str]:
    """What a StopTrimmer lets through, piece by piece, and what it flushes."""
    trimmer = StopTrimmer(stops)
    return [trimmer.feed(p) for p in pieces], trimmer.flush()


def test_stop_trimmer_holds_back_only_possible_stop_prefixes() -> None:
    assert trimmed(["The capital ", "of Fr", "ance is Par", "is."], ("Paris",)) == (
        ["The capital ", "of Fr", "ance is ", ""],
        "",
    )
    assert trimmed(["ab", "c"], ()) == (["ab", "c"], "")
    assert trimmed(["x P", "a", "y"], ("Paris",)) == (["x ", "", "Pay"], "")
    assert trimmed(["x P", "a"], ("Paris",)) == (["x ", ""], "Pa")  # the end releases it
    assert trimmed(["a##", "#b"], ("###", "#!")) == (["a", ""], "")


def test_first_stop_is_the_earliest() -> None:
    assert first_stop("one two three", ("three", "two")) == 4
    assert first_stop("nothing", ("zzz",)) is None


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("user:alice", ("alice", "active")),
        ("user:a.b-c_1:v12", ("a.b-c_1", "v12")),
        ("user:alice:base", ("alice", "base")),
    ],
)
def test_model_ids(model: str, expected: tuple[str, str]) -> None:
    assert parse_model_id(model) == expected


@pytest.mark.parametrize("model", ["gpt-4o", "user:", "user:a:b:c", "alice", "user:alice:active"])
def test_bad_model_ids(model: str) -> None:
    with pytest.raises((NotFound, InvalidRequest)):
        parse_model_id(model)


def test_selectors_and_name_patterns() -> None:
    assert [parse_selector(s) for s in ("active", "base", "v3", "3")] == ["active", "base", 3, 3]
    for bad in ("v0", "v", "latest", "-1", "v3a"):
        with pytest.raises(InvalidRequest):
            parse_selector(bad)
    pattern = name_pattern("a")
    assert pattern.fullmatch("user-a-v1") and pattern.fullmatch("user-a-v12")
    assert not pattern.fullmatch("user-a-v1-v2") and not pattern.fullmatch("user-ab-v1")


def test_generate_body_needs_exactly_one_prompt() -> None:
    assert GenerateIn(prompt="hi").chat() == [{"role": "user", "content": "hi"}]
    bodies: list[dict[str, object]] = [
        {},
        {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]},
        {"messages": []},
        {"prompt": ""},
        {"prompt": "hi", "stop": [""]},
    ]
    for body in bodies:
        with pytest.raises(ValidationError):
            GenerateIn.model_validate(body)


def test_openai_body_accepts_client_shapes() -> None:
    body = ChatCompletionIn.model_validate(
        {
            "model": "user:a",
            "max_completion_tokens": 5,
            "logprobs": False,
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}],
                },
            ],
        }
    )
    assert body.chat() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
    ]
    assert body.token_limit() == 5
    nulls = ChatCompletionIn.model_validate(
        {
            "model": "user:a",
            "messages": [{"role": "user", "content": "x"}],
            "temperature": None,
            "top_p": None,
            "n": None,
            "stop": None,
            "tools": [],
            "parallel_tool_calls": True,
            "response_format": {"type": "json_object"},
        }
    )  # OpenAI's spec allows explicit nulls: they mean the default
    assert (nulls.temperature, nulls.top_p, nulls.n) == (1.0, 1.0, 1)
    assert nulls.engine_options()["response_format"].schema is None
    changes: list[dict[str, object]] = [
        {"tools": [{"type": "function"}]},
        {"n": 9},
        {"messages": []},
        {"top_logprobs": 2},  # without logprobs
        {"tool_choice": "required"},
        {"response_format": {"type": "json_schema"}},  # without its schema
        {"logit_bias": {"abc": 1}},
        {"logit_bias": {"5": 101}},
        {"presence_penalty": 3},
        {"functions": [{"name": "f"}]},  # unknown to us: refused, not dropped
    ]
    for change in changes:
        with pytest.raises(ValidationError):
            ChatCompletionIn.model_validate(
                {"model": "user:a", "messages": [{"role": "user", "content": "x"}], **change}
            )


@pytest.fixture(scope="module")
def model_folder() -> Path:
    """The converted bundled model (the tokenizer files are what matter here)."""
    from tests.integration.generation_support import model_dir

    return model_dir()


def test_prompt_tokens_match_transformers_without_importing_torch(model_folder: Path) -> None:
    counter = PromptTokenCounter(lambda: model_folder)
    counts = [counter.count(c) for c in CONVERSATIONS]
    assert counter.exact
    from transformers import AutoTokenizer  # imports torch: only after our count

    tokenizer: Any = AutoTokenizer.from_pretrained(str(model_folder))
    encoded = [
        tokenizer.apply_chat_template(c, add_generation_prompt=True, return_dict=True)
        for c in CONVERSATIONS
    ]
    expected = [len(e["input_ids"]) for e in encoded]
    assert counts == expected


def test_counting_does_not_import_torch(model_folder: Path) -> None:
    import subprocess

    code = (
        "import sys; from pathlib import Path; from app.inference.tokens import "
        "PromptTokenCounter as C; "
        f"n = C(lambda: Path({str(model_folder)!r})).count([{{'role': 'user', 'content': 'hi'}}]);"
        "assert n > 0 and 'torch' not in sys.modules, n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_counter_estimates_until_the_tokenizer_appears(model_folder: Path, tmp_path: Path) -> None:
    counter = PromptTokenCounter(lambda: tmp_path)
    assert counter.count(CONVERSATIONS[0]) == estimate_tokens(CONVERSATIONS[0])
    assert not counter.exact
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(model_folder / name, tmp_path / name)
    assert counter.exact and counter.count(CONVERSATIONS[0]) == 37


async def test_adapter_load_locks_are_shared_while_held_and_then_forgotten() -> None:
    """Concurrent loads of one name on one server wait on one lock; once no load holds it, the
    replica keeps nothing for that name (a long-running API serves ever new version names)."""
    replica = VllmReplica("http://127.0.0.1:9", {}, 1.0)
    order: list[str] = []

    async def load(tag: str) -> None:
        async with replica.lock("user:a:v1"):
            order.append(f"{tag} in")
            await asyncio.sleep(0.01)
            order.append(f"{tag} out")

    await asyncio.gather(load("first"), load("second"))
    assert order == ["first in", "first out", "second in", "second out"]
    assert len(replica.locks) == 0
    await replica.http.aclose()
