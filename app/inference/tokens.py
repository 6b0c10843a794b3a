"""Counting prompt tokens in the API process, without torch.

`transformers.AutoTokenizer` imports torch (seen with transformers 5.19), which the API image must
not need. The model folder's `tokenizer.json` (the `tokenizers` library) and its chat template
(rendered with Jinja2 the way transformers renders it) give the same count. Where those are not
installed or the folder has no tokenizer.json, a cheap character-based estimate stands in; the
engine itself still refuses prompts over its context length.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
CHARS_PER_TOKEN_ESTIMATE = 4
TOKENS_PER_MESSAGE_ESTIMATE = 4

Messages = list[dict[str, str]]
Encode = Callable[[str], int]
Render = Callable[[Messages], str]


class PromptTokenCounter:
    """Counts the tokens of a chat prompt as the engine will see it (chat template applied)."""

    def __init__(self, model_dir: Callable[[], Path]) -> None:
        self._model_dir = model_dir
        self._lock = threading.Lock()
        self._loaded = False
        self._warned = False
        self._encode: Callable[[str], int] | None = None
        self._render: Callable[[Messages], str] | None = None
        self._vocab_size: int | None = None

    @property
    def exact(self) -> bool:
        """True when counts come from the real tokenizer, False for the character estimate."""
        self._ensure_loaded()
        return self._encode is not None

    def count(self, messages: Messages) -> int:
        """Tokens of the templated prompt (generation prompt included)."""
        self._ensure_loaded()
        if self._encode is None or self._render is None:
            return estimate_tokens(messages)
        return self._encode(self._render(messages))

    def count_text(self, text: str) -> int:
        """Tokens of a raw text prompt (no template), as a text completion sends it."""
        self._ensure_loaded()
        if self._encode is None:
            return math.ceil(len(text) / CHARS_PER_TOKEN_ESTIMATE)
        return self._encode(text)

    @property
    def vocab_size(self) -> int | None:
        """The tokenizer's vocabulary size (None while counts are estimated)."""
        self._ensure_loaded()
        return self._vocab_size

    def _ensure_loaded(self) -> None:
        """Load tokenizer and template once the model folder exists (thread-safe)."""
        with self._lock:
            if self._loaded:
                return
            folder = self._model_dir()
            if (folder / "tokenizer.json").is_file():
                self._encode, self._render, self._vocab_size = _load_exact(folder)
                self._loaded = True  # for good: exact, or estimated when the libraries are absent
            if self._encode is None and not self._warned:
                log.warning("prompt tokens estimated from characters (no tokenizer in %s)", folder)
                self._warned = True


def estimate_tokens(messages: Messages) -> int:
    """Cheap stand-in: about 4 characters per token plus a few tokens of template per message."""
    chars = sum(len(m.get("content", "")) for m in messages)
    return math.ceil(chars / CHARS_PER_TOKEN_ESTIMATE) + TOKENS_PER_MESSAGE_ESTIMATE * len(messages)


def _load_exact(folder: Path) -> tuple[Encode | None, Render | None, int | None]:
    """(encode → count, render, vocabulary size) from tokenizer.json and the chat template."""
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer
    except ImportError:
        return None, None, None
    template_text, special = _chat_template(folder)
    if template_text is None:
        return None, None, None
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = _raise_template_error
    template = env.from_string(template_text)

    def render(messages: Messages) -> str:
        try:
            return template.render(messages=messages, add_generation_prompt=True, **special)
        except TemplateError as exc:
            raise ValueError(f"chat template: {exc}") from exc

    def encode(text: str) -> int:
        # The template already holds the special tokens, as in apply_chat_template.
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    return encode, render, tokenizer.get_vocab_size(with_added_tokens=True)


def _chat_template(folder: Path) -> tuple[str | None, dict[str, Any]]:
    """The chat template (chat_template.jinja or tokenizer_config.json) and its special tokens."""
    config_file = folder / "tokenizer_config.json"
    config: dict[str, Any] = json.loads(config_file.read_text()) if config_file.is_file() else {}
    special = {
        k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
    }
    jinja_file = folder / "chat_template.jinja"
    template = jinja_file.read_text() if jinja_file.is_file() else config.get("chat_template")
    return (template if isinstance(template, str) else None), special


def _token_text(value: Any) -> str:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return str(value or "")


def _raise_template_error(message: str) -> None:
    """What `raise_exception(...)` in a chat template does."""
    raise ValueError(f"chat template: {message}")
