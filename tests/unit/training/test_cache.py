"""Cache implementations and cache keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from foundation.pairs import prompt_hash
from foundation.train_config import TrainConfig
from worker.training.cache import (
    CACHE_FORMAT,
    CacheFileError,
    JsonFileCache,
    MemoryCache,
    base_response_key,
    reference_key,
)

MESSAGES = [{"role": "user", "content": "Hi"}]


def test_memory_cache_returns_only_present_keys() -> None:
    cache = MemoryCache()
    cache.put_many({"a": 1.5, "b": "text"})
    assert cache.get_many(["a", "b", "c"]) == {"a": 1.5, "b": "text"}


def test_json_file_cache_persists(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "cache.json"
    JsonFileCache(path).put_many({"k": -3.25, "b": "answer"})
    assert JsonFileCache(path).get_many(["k", "b"]) == {"k": -3.25, "b": "answer"}
    names = sorted(p.name for p in path.parent.iterdir())
    assert names == [".cache.json.lock", "cache.json"]  # no temp files left; the lock stays


def test_json_file_caches_sharing_a_file_keep_each_others_entries(tmp_path: Path) -> None:
    path = tmp_path / "shared.json"
    first, second = JsonFileCache(path), JsonFileCache(path)  # two processes, both opened early
    first.put_many({"a": 1})
    second.put_many({"b": 2})  # before the merge, this rewrite dropped "a"
    assert JsonFileCache(path).get_many(["a", "b"]) == {"a": 1, "b": 2}


def test_json_file_cache_refuses_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "cache.json"
    path.write_text("[1, 2]")
    with pytest.raises(CacheFileError, match="JSON object"):
        JsonFileCache(path)
    path.write_text("{oops")
    with pytest.raises(CacheFileError, match="cannot read"):
        JsonFileCache(path)


def test_keys_depend_on_model_prompt_response_and_limits() -> None:
    assert prompt_hash(MESSAGES) == prompt_hash([{"content": "Hi", "role": "user"}])
    assert prompt_hash(MESSAGES) != prompt_hash([{"role": "user", "content": "Hi!"}])
    assert base_response_key("m1", MESSAGES) == f"m1:{prompt_hash(MESSAGES)}"
    assert base_response_key("m1", MESSAGES) != base_response_key("m2", MESSAGES)
    greedy = base_response_key("m1", MESSAGES, TrainConfig(base_max_new_tokens=64))
    assert greedy == f"m1:{prompt_hash(MESSAGES)}:64:greedy:g{CACHE_FORMAT}"
    assert greedy != base_response_key("m1", MESSAGES, TrainConfig(base_max_new_tokens=32))
    sampled = TrainConfig(base_max_new_tokens=64, base_do_sample=True)
    assert greedy != base_response_key("m1", MESSAGES, sampled)
    config = TrainConfig(max_prompt_tokens=64, max_response_tokens=32)
    key = reference_key("m1", MESSAGES, "Hello", config)
    assert key.startswith(f"m1:{prompt_hash(MESSAGES)}:") and key.endswith(
        f":64:32:g{CACHE_FORMAT}"
    )
    assert key != reference_key("m1", MESSAGES, "Hello!", config)
    assert key != reference_key("m1", MESSAGES, "Hello", TrainConfig(max_response_tokens=31))
