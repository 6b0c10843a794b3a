"""Helpers for the generation tests: the bundled model, small PEFT adapters, SSE parsing.

The adapters are real PEFT LoRA adapters with random (not zero) B matrices, so that each one
changes the greedy output of the bundled model in its own way, without any training run.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import httpx

from app.api.state import app_state
from app.core.db import transaction
from app.services import adapters as adapter_service
from tests.support import Api, LiveServer

REPO = Path(__file__).resolve().parents[2]
SERVED_NAME = "smollm2-135m-instruct"
PROMPT = "What is the capital of France?"
MESSAGES = [{"role": "user", "content": PROMPT}]
MAX_TOKENS = 12
# The test process never reaches a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@cache
def model_dir() -> Path:
    """The bundled model as a safetensors folder, converted once into the repo's data/ folder."""
    from foundation.model import prepare_base_model

    return prepare_base_model(REPO / "data")


def build_adapters(out_dir: Path, seeds: list[int], scale: float = 1.0) -> dict[int, Path]:
    """One rank-8 LoRA adapter per seed on all linear layers, random B (scaled), saved with PEFT.

    The serving benchmark's builder: the same adapters the benchmark serves.
    """
    from bench.serving.adapters import build_adapters as build

    return dict(zip(seeds, build(model_dir(), out_dir, seeds, scale), strict=True))


def publish(server: LiveServer, user_id: str, folder: Path, *, gate_passed: bool = True) -> int:
    """What the training worker does: copy into ADAPTER_DIR/<user>/v<N>, then register_adapter."""
    with transaction(app_state(server.app).session_factory) as session:
        version = adapter_service.next_version(session, user_id)
        target = server.settings.adapter_store.version_folder(user_id, version)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(folder, target)
        adapter = adapter_service.register_adapter(
            session,
            user_id,
            target,
            job_id=None,
            method="bapo",
            metrics={"test": True},
            gate_passed=gate_passed,
            gate_reason=None if gate_passed else "retention",
            resolver_base=server.settings.adapter_store.resolver_base,
        )
        return adapter.version


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """One torch thread in this process for the block, then back to what it was.

    The machine is shared with other test runs: one thread decodes this small model several
    times faster than two fighting for busy cores (measured 10.6 vs 1.4 tokens/s).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@cache
def _reference_model() -> tuple[Any, Any]:
    """A private copy of the base model for reference outputs (not the server's)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir()))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir()), dtype=torch.float32).eval()
    return tokenizer, model


def forget_reference_model() -> None:
    """Free the reference model's memory once a module has its reference texts."""
    _reference_model.cache_clear()


def reference_greedy(
    adapter: Path | None, messages: list[dict[str, str]] = MESSAGES, max_tokens: int = MAX_TOKENS
) -> str:
    """Greedy text from plain transformers (+ PEFT), independent of the service's code."""
    import torch
    from peft import PeftModel

    tokenizer, base = _reference_model()
    model = PeftModel.from_pretrained(base, str(adapter)) if adapter else base
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
    if adapter:
        model.unload()
    prompt_length = inputs["input_ids"].shape[1]
    return str(tokenizer.decode(output[0, prompt_length:], skip_special_tokens=True))


def sse_events(response: httpx.Response) -> list[Any]:
    """The `data:` payloads of an SSE body (JSON decoded; `[DONE]` kept as a string)."""
    assert response.headers["content-type"].startswith("text/event-stream"), response.headers
    events: list[Any] = []
    for block in response.text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block.removeprefix("data: ")
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def check_chunks(events: list[Any], *, usage: bool) -> tuple[str, str]:
    """Assert OpenAI chunk well-formedness; return (concatenated text, finish_reason)."""
    assert events[-1] == "[DONE]", events[-3:]
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks), chunks
    assert len({c["id"] for c in chunks}) == 1, "one id per stream"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    if usage:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
        chunks = chunks[:-1]
    else:
        assert all("usage" not in c for c in chunks)
    finish = chunks[-1]["choices"][0]["finish_reason"]
    assert finish in ("stop", "length") and chunks[-1]["choices"][0]["delta"] == {}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    return text, finish


def new_user(api: Api, prefix: str = "u") -> tuple[str, dict[str, str]]:
    """A user with a unique id."""
    return api.create_user(f"{prefix}{uuid.uuid4().hex[:10]}")


def generate(api: Api, user_id: str, headers: dict[str, str], **body: object) -> httpx.Response:
    """POST /users/{id}/generate, greedy and short unless told otherwise."""
    payload = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, **body}
    return api.http.post(f"/users/{user_id}/generate", json=payload, headers=headers)


def generated(api: Api, user_id: str, headers: dict[str, str], **body: object) -> dict[str, object]:
    """The JSON of a successful generate."""
    response = generate(api, user_id, headers, **body)
    assert response.status_code == 200, response.text
    data: dict[str, object] = response.json()
    return data
