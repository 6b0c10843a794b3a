"""Hardened training jobs end to end (real API, Postgres, Redis, Celery workers, bundled model):
an adapter the inference server would refuse is never published."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.worker_support import (
    JOB_TIMEOUT_S,
    Stack,
    adapter_listing,
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


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("hardening-stack")
    with job_stack(data_dir, VLLM_MAX_LORA_RANK=str(WORKER_MAX_LORA_RANK)) as stack:
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
