"""Key-value caches for base responses and reference log-probs (callers choose the storage).

Keys (values: a Generation's JSON text for base answers, float for reference log-probs):
  base answer:        f"{model_identity}:{prompt_hash}:{base_max_new_tokens}:{greedy|sampled}"
                      f":g{CACHE_FORMAT}"
  reference log-prob: f"{model_identity}:{prompt_hash}:{sha256(response)[:32]}"
                      f":{max_prompt_tokens}:{max_response_tokens}:g{CACHE_FORMAT}"
A response is hashed as its text, or for a base answer as its generated token ids. CACHE_FORMAT
changes whenever what a value means changes, so no cache written by an older engine is reused.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from foundation.pairs import prompt_hash

if TYPE_CHECKING:
    from foundation.pairs import Messages
    from foundation.train_config import TrainConfig


CACHE_FORMAT = 2  # 2: base answers keep their generated token ids (no invented end-of-turn)


def base_response_key(identity: str, messages: Messages, config: TrainConfig | None = None) -> str:
    """Cache key of the base response to a prompt (and, given a config, how it was decoded).

    The decoding settings are part of the key so changing `base_max_new_tokens` or
    `base_do_sample` never silently reuses answers decoded another way.
    """
    key = f"{identity}:{prompt_hash(messages)}"
    if config is None:
        return key
    decoding = "sampled" if config.base_do_sample else "greedy"
    return f"{key}:{config.base_max_new_tokens}:{decoding}:g{CACHE_FORMAT}"


def reference_key(identity: str, messages: Messages, response: str, config: TrainConfig) -> str:
    """Cache key of log πref(response | prompt) under the config's truncation limits."""
    response_hash = hashlib.sha256(response.encode("utf-8")).hexdigest()[:32]
    limits = f"{config.max_prompt_tokens}:{config.max_response_tokens}"
    return f"{identity}:{prompt_hash(messages)}:{response_hash}:{limits}:g{CACHE_FORMAT}"


class CacheFileError(ValueError):
    """A cache file exists but does not hold a JSON object."""


class KeyValueCache(Protocol):
    """What the engine needs from a cache: batched get (missing keys absent) and batched put."""

    def get_many(self, keys: list[str]) -> dict[str, Any]:
        """Values of the keys that are present."""
        ...

    def put_many(self, items: dict[str, Any]) -> None:
        """Store (or overwrite) these items."""
        ...


class MemoryCache:
    """A dict-backed cache (tests, one process)."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def get_many(self, keys: list[str]) -> dict[str, Any]:
        """Values of the keys that are present."""
        return {key: self.data[key] for key in keys if key in self.data}

    def put_many(self, items: dict[str, Any]) -> None:
        """Store (or overwrite) these items."""
        self.data.update(items)


class JsonFileCache(MemoryCache):
    """A cache kept as one JSON object in a file, rewritten atomically on each put (CLI use).

    Processes may share the file (e.g. the forgetting benchmark's workers): each put merges what
    the file holds now, under an exclusive lock on a `.lock` sibling, so no entry is lost.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = Path(path)
        if self.path.exists():
            self.data = _read_json_object(self.path)

    def put_many(self, items: dict[str, Any]) -> None:
        """Store these items and rewrite the file."""
        if not items:
            return
        super().put_many(items)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.with_name(f".{self.path.name}.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.exists():
                self.data = {**_read_json_object(self.path), **self.data}
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    json.dump(self.data, handle)
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise


def _read_json_object(path: Path) -> dict[str, Any]:
    """Load a JSON object from a file, refusing anything else."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheFileError(f"cannot read cache file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CacheFileError(f"cache file {path} does not hold a JSON object")
    return data
