"""Crash safety of training jobs on the real stack (API, Postgres, Redis, Celery worker processes,
the bundled model): the training worker SIGKILLed in each phase of a job, and an adapter store that
refuses the adapter's bytes (a full disk).

The worker is held at a phase boundary by its test-only hook (BAPO_TEST_PAUSE_FILE, see
worker/jobs.py `hold_for_tests`): the job records the phase, keeps its heartbeat, and waits while
the pause file names that phase; the test then kills the worker with SIGKILL. (Held at the start
of a phase, not in its middle; "publishing" is held before the staging folder is renamed to its
version, so the rename-to-commit window is not killed here: see worker/runner.py.)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.generation_support import generated
from tests.worker_support import (
    JOB_TIMEOUT_S,
    STACK_SETTINGS,
    Stack,
    adapter_listing,
    events,
    file_size_limit,
    get_job,
    hidden_entries,
    job_stack,
    post_pairs,
    train_and_wait,
    version_folders,
    wait_for,
    wait_status,
)
from worker.jobs import PAUSE_FILE_ENV

pytestmark = pytest.mark.slow
PHASES = ["base_responses", "reference_logprobs", "training", "publishing"]
# Room left on the "full disk": the tiny training's adapter (~1.8 MB: rank 8 on q/v, float32)
# does not fit, so its write fails part-way.
FREE_BYTES = 256 * 1024


@dataclass(frozen=True)
class Trainee:
    """A user with pairs and an active adapter."""

    user_id: str
    headers: dict[str, str]


@pytest.fixture(scope="module")
def pause_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The file the workers' test hook reads (absent: no pause)."""
    return tmp_path_factory.mktemp("pause") / "phase"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pause_file: Path) -> Iterator[Stack]:
    """The whole service, its workers started with the pause hook on."""
    hook = {PAUSE_FILE_ENV: str(pause_file)}
    with job_stack(tmp_path_factory.mktemp("crash-stack"), **hook) as stack:
        yield stack


@pytest.fixture(scope="module")
def trainee(stack: Stack) -> Trainee:
    """A user trained once (v1 active), so every crash below has an adapter to keep."""
    user_id, headers = stack.api.create_user("crash")
    post_pairs(stack.api.http, user_id, headers)
    job = train_and_wait(stack.api.http, user_id, headers)
    assert (job["status"], job["adapter_version"]) == ("succeeded", 1), job
    return Trainee(user_id, headers)


def store_state(stack: Stack, user: Trainee) -> tuple[dict[str, Any], list[str]]:
    """What is visible of the user's adapters: the API listing and the version folders."""
    listing = adapter_listing(stack.api.http, user.user_id, user.headers)
    return listing, version_folders(stack.settings.adapters_path, user.user_id)


@pytest.mark.parametrize("phase", PHASES)
def test_worker_killed_in_phase_publishes_nothing_and_the_retry_succeeds(
    stack: Stack, trainee: Trainee, pause_file: Path, phase: str
) -> None:
    stack.ensure_gpu_worker()
    http, store, user_id = stack.api.http, stack.settings.adapters_path, trainee.user_id
    before, folders = store_state(stack, trainee)
    assert before["active_version"] == len(folders) and hidden_entries(store, user_id) == []

    pause_file.write_text(phase)
    try:
        response = http.post(f"/users/{user_id}/train", json={}, headers=trainee.headers)
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        wait_for(
            lambda: (
                (job := get_job(http, user_id, job_id, trainee.headers))["status"] == "running"
                and job["phase"] == phase
            ),
            JOB_TIMEOUT_S,
            f"the job to be held in {phase}",
        )
        stack.gpu.kill()  # SIGKILL: no shutdown code, the message stays unacknowledged
    finally:
        pause_file.unlink(missing_ok=True)

    assert store_state(stack, trainee) == (before, folders)  # nothing of the new run visible
    staging = f".staging-{job_id}-a1"
    if phase == "publishing":  # the complete adapter waits in its hidden staging folder
        assert hidden_entries(store, user_id) == [staging]
    else:
        assert hidden_entries(store, user_id) == []

    # Never stuck: the reaper finds the heartbeat stale, requeues the job (attempt 1 of 2) and
    # deletes the staging folder; a fresh worker runs attempt 2 to the end.
    stack.start_gpu_worker()
    ends = {"succeeded", "failed", "cancelled"}
    bound = STACK_SETTINGS["job_stale_after_s"] + JOB_TIMEOUT_S
    job = wait_status(http, user_id, job_id, trainee.headers, ends, bound)
    requeued = [
        e["data"]["message"]
        for e in events(http, user_id, job_id, trainee.headers, "status")
        if e["data"].get("status") == "queued"
    ]
    assert len(requeued) == 2 and "lost (no heartbeat" in requeued[1], requeued
    new = before["active_version"] + 1
    assert (job["status"], job["attempts"], job["adapter_version"]) == ("succeeded", 2, new), job

    after, new_folders = store_state(stack, trainee)
    assert after["active_version"] == new
    assert [a["version"] for a in after["data"]] == [new, *[a["version"] for a in before["data"]]]
    assert new_folders == sorted([*folders, f"v{new}"])
    assert hidden_entries(store, user_id) == []  # the killed attempt's staging is gone


def test_full_adapter_store_fails_the_job_cleanly_and_keeps_the_active_adapter(
    stack: Stack, trainee: Trainee
) -> None:
    stack.ensure_gpu_worker()
    http, store, user_id = stack.api.http, stack.settings.adapters_path, trainee.user_id
    before, folders = store_state(stack, trainee)
    active = before["active_version"]
    adapter_bytes = (store / user_id / f"v{active}" / "adapter_model.safetensors").stat().st_size

    # The disk fills up under the running worker: no file it writes may grow past FREE_BYTES more
    # than its log has now (RLIMIT_FSIZE). Like ENOSPC, the kernel refuses the write(2) part-way
    # through the adapter's file; unlike chmod it holds for root, and it needs no mount privilege.
    # The worker writes nothing else but its log (a few KiB per job).
    assert stack.gpu.process is not None
    limit = stack.gpu.log_path.stat().st_size + FREE_BYTES
    assert limit < adapter_bytes // 2, (limit, adapter_bytes)
    with file_size_limit(stack.gpu.process.pid, limit):
        job = train_and_wait(http, user_id, trainee.headers)
    assert (job["status"], job["attempts"], job["adapter_version"]) == ("failed", 1, None), job
    assert f"could not write the adapter into {store / user_id}" in job["error"], job["error"]
    assert "File too large" in job["error"], job["error"]

    assert store_state(stack, trainee) == (before, folders)  # nothing partial visible
    assert hidden_entries(store, user_id) == []  # the half-written file was deleted
    served = generated(stack.api, user_id, trainee.headers, max_tokens=4)
    assert (served["adapter_version"], served["model"]) == (active, f"user:{user_id}:v{active}")

    # Space again (the limit is lifted): the same worker's next job publishes.
    job = train_and_wait(http, user_id, trainee.headers)
    assert (job["status"], job["adapter_version"]) == ("succeeded", active + 1), job
    assert store_state(stack, trainee)[1] == sorted([*folders, f"v{active + 1}"])
    served = generated(stack.api, user_id, trainee.headers, max_tokens=4)
    assert served["adapter_version"] == active + 1
