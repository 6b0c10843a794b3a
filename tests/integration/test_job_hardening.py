"""Hardened training jobs end to end (real API, Postgres, Redis, Celery workers, bundled model):
an adapter the inference server would refuse is never published; users never see whether the
shared caches already held their prompts (operators get the aggregate counts in /metrics)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fault_support import private_redis
from tests.support import LiveServer, make_settings
from tests.worker_support import (
    JOB_TIMEOUT_S,
    Stack,
    adapter_listing,
    cache_lookups,
    events,
    hidden_entries,
    job_stack,
    post_pairs,
    train_and_wait,
    version_folders,
    wait_for,
    wait_status,
)

pytestmark = pytest.mark.slow
# The workers are configured for a smaller inference server than the API (VLLM_MAX_LORA_RANK 64):
# a job the API accepted can still train an adapter that server would refuse.
WORKER_MAX_LORA_RANK = 8
ENDED = {"succeeded", "failed", "cancelled"}
CACHE_FIGURES = ("cache_stats", "base_reused", "ref_reused", "base_computed", "ref_computed")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """job_stack's service, on a private Redis: no other suite's worker takes these messages."""
    data_dir = tmp_path_factory.mktemp("hardening-stack")
    rank = {"VLLM_MAX_LORA_RANK": str(WORKER_MAX_LORA_RANK)}
    with private_redis() as redis_server, job_stack(data_dir, redis_server.url, **rank) as stack:
        yield stack


def test_an_adapter_above_the_servers_rank_fails_and_the_previous_stays_active(
    stack: Stack,
) -> None:
    http = stack.api.http
    user_id, headers = stack.api.create_user("rank-bound")
    post_pairs(http, user_id, headers)
    first = train_and_wait(http, user_id, headers)  # TINY_TRAINING: rank 8
    assert (first["status"], first["adapter_version"]) == ("succeeded", 1), first

    body = {"hyperparameters": {"lora_rank": 16}}  # the API allows 64; the workers' server 8
    response = http.post(f"/users/{user_id}/train", json=body, headers=headers)
    assert response.status_code == 202, response.text
    job = wait_status(http, user_id, response.json()["id"], headers, ENDED, JOB_TIMEOUT_S)

    assert job["status"] == "failed" and job["attempts"] == 1, job
    assert job["error"].startswith("AdapterNotServable: "), job["error"]
    assert "LoRA rank 16" in job["error"] and "VLLM_MAX_LORA_RANK" in job["error"]
    assert job["adapter_version"] is None
    listing = adapter_listing(http, user_id, headers)
    assert listing["active_version"] == 1
    assert [(a["version"], a["active"]) for a in listing["data"]] == [(1, True)]
    adapters = stack.settings.adapters_path
    assert version_folders(adapters, user_id) == ["v1"]
    wait_for(lambda: hidden_entries(adapters, user_id) == [], 10, "staging removed")


def _delta(after: dict[tuple[str, str], float], before: dict[tuple[str, str], float]) -> dict:
    return {key: after[key] - before.get(key, 0.0) for key in after}


def _assert_no_cache_figures(
    http: httpx.Client, user_id: str, job: dict, headers: dict[str, str]
) -> None:
    assert job["metrics"]["steps"] == 2 and "train_reward_accuracy" in job["metrics"]
    seen = _user_visible(http, user_id, job["id"], headers)
    assert [name for name in CACHE_FIGURES if name in seen] == []


def _user_visible(http: httpx.Client, user_id: str, job_id: str, headers: dict[str, str]) -> str:
    """Everything the user reads about the job and its adapter, as JSON text."""
    base = f"/users/{user_id}"
    reads = [
        http.get(f"{base}/train/jobs/{job_id}", headers=headers),
        http.get(f"{base}/train/jobs", headers=headers),
        http.get(f"{base}/adapters", headers=headers),
    ]
    assert all(r.status_code == 200 for r in reads), [r.text for r in reads]
    every_event = events(http, user_id, job_id, headers)
    return " ".join(r.text for r in reads) + str(every_event)


def test_users_never_see_cache_figures_operators_get_counters(stack: Stack) -> None:
    http = stack.api.http
    before = cache_lookups(http)
    first_id, first_headers = stack.api.create_user("cache-first")
    post_pairs(http, first_id, first_headers, topic="planet")
    first = train_and_wait(http, first_id, first_headers)
    assert first["status"] == "succeeded", first
    _assert_no_cache_figures(http, first_id, first, first_headers)
    computed = _delta(cache_lookups(http), before)
    assert computed[("base_response", "hit")] == 0 and computed[("base_response", "miss")] == 4
    assert computed[("reference_logprob", "hit")] == 0
    assert computed[("reference_logprob", "miss")] >= 8  # chosen + rejected (+ base) per pair

    # Another user sends the same pairs: everything is reused, and nothing tells them so.
    second_id, second_headers = stack.api.create_user("cache-second")
    post_pairs(http, second_id, second_headers, topic="planet")
    middle = cache_lookups(http)
    second = train_and_wait(http, second_id, second_headers)
    assert second["status"] == "succeeded", second
    _assert_no_cache_figures(http, second_id, second, second_headers)
    reused = _delta(cache_lookups(http), middle)
    assert reused[("base_response", "hit")] == 4 and reused[("base_response", "miss")] == 0
    assert reused[("reference_logprob", "hit")] == computed[("reference_logprob", "miss")]
    assert reused[("reference_logprob", "miss")] == 0


def test_open_metrics_still_hide_the_cache_counters(tmp_path: Path) -> None:
    server = LiveServer(make_settings(tmp_path, metrics_require_operator_key=False)).start()
    try:
        anonymous = httpx.get(f"{server.url}/metrics", timeout=30)
        assert anonymous.status_code == 200 and "bapo_http_requests_total" in anonymous.text
        assert "bapo_training_cache_lookups" not in anonymous.text
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert cache_lookups(http) == {
                (cache, result): 0.0
                for cache in ("base_response", "reference_logprob", "gate_baseline")
                for result in ("hit", "miss")
            }
    finally:
        server.stop()
