"""Training jobs end to end: the real API, Postgres, Redis, real Celery worker processes (a `gpu`
worker and a `default` worker running beat), and the real bundled model on tiny trainings."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import func, select

from app.api.state import app_state
from app.core.db import transaction
from app.models import BaseResponse, PreferencePair, TrainingJob
from app.queue import TRAIN_TASK, producer
from app.services import jobs as job_service
from tests.worker_support import (
    JOB_TIMEOUT_S,
    LONG_TRAINING,
    STACK_SETTINGS,
    TINY_TRAINING,
    Stack,
    adapter_listing,
    cache_lookups,
    events,
    get_job,
    hidden_entries,
    job_stack,
    post_pairs,
    train_and_wait,
    version_folders,
    wait_for,
    wait_status,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The whole service on Postgres + Redis, with real worker processes."""
    with job_stack(tmp_path_factory.mktemp("jobs-stack")) as stack:
        yield stack


@dataclass
class Run:
    """What the end-to-end run observed."""

    user_id: str
    headers: dict[str, str]
    job_id: str
    created: dict[str, Any]
    seen: list[str]
    second_triggers: list[tuple[int, dict[str, Any]]]
    final: dict[str, Any]
    duplicate_task_ids: list[str]


@pytest.fixture(scope="module")
def e2e(stack: Stack) -> Run:
    """One user trained over HTTP, watched while it runs (shared by the tests below)."""
    http = stack.api.http
    user_id, headers = stack.api.create_user("e2e")
    post_pairs(http, user_id, headers)
    response = http.post(f"/users/{user_id}/train", json={}, headers=headers)
    assert response.status_code == 202, response.text
    created = response.json()
    job_id = created["id"]
    duplicate = producer(stack.settings).send_task(TRAIN_TASK, args=[job_id], queue="gpu")
    seen, triggers = [created["status"]], []
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while seen[-1] not in ("succeeded", "failed", "cancelled") and time.monotonic() < deadline:
        if len(triggers) < len(seen):  # trigger again once in each active status
            again = http.post(f"/users/{user_id}/train", json={}, headers=headers)
            triggers.append((again.status_code, again.json()))
        status = get_job(http, user_id, job_id, headers)["status"]
        if status != seen[-1]:
            seen.append(status)
        time.sleep(0.2)
    final = get_job(http, user_id, job_id, headers)
    return Run(user_id, headers, job_id, created, seen, triggers, final, [duplicate.id])


def test_training_job_goes_queued_running_succeeded(e2e: Run) -> None:
    assert e2e.created["status"] == "queued" and e2e.created["pair_count"] == 4
    assert e2e.seen == ["queued", "running", "succeeded"], e2e.final
    job = e2e.final
    assert job["progress"] == 1.0 and job["attempts"] == 1 and job["error"] is None
    assert job["adapter_version"] == 1
    assert job["hyperparameters"]["max_steps"] == TINY_TRAINING["max_steps"]
    assert job["started_at"] and job["finished_at"] and job["duration_s"] > 0
    assert job["metrics"]["steps"] == 2 and "train_reward_accuracy" in job["metrics"]
    assert job["gate"]["passed"] is True


def test_events_record_every_step_and_phase(stack: Stack, e2e: Run) -> None:
    http = stack.api.http
    steps = events(http, e2e.user_id, e2e.job_id, e2e.headers, kind="step")
    assert [e["step"] for e in steps] == [1, 2]
    assert {"loss", "dpo_loss", "anchor_loss", "reward_accuracy", "lr"} <= set(steps[0]["data"])
    phases = [
        e["data"]["phase"] for e in events(http, e2e.user_id, e2e.job_id, e2e.headers, "phase")
    ]
    for phase in ("base_responses", "reference_logprobs", "training", "gate", "publishing"):
        assert phase in phases


def test_adapter_v1_is_listed_active_and_complete(stack: Stack, e2e: Run) -> None:
    response = stack.api.http.get(f"/users/{e2e.user_id}/adapters", headers=e2e.headers)
    assert response.status_code == 200, response.text
    listing = response.json()
    assert listing["active_version"] == 1
    assert [(a["version"], a["active"], a["job_id"]) for a in listing["data"]] == [
        (1, True, e2e.job_id)
    ]
    folder = stack.settings.adapters_path / e2e.user_id / "v1"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in folder.iterdir()
    }
    assert version_folders(stack.settings.adapters_path, e2e.user_id) == ["v1"]
    assert hidden_entries(stack.settings.adapters_path, e2e.user_id) == []


def test_the_gate_figures_are_listed_and_the_base_is_measured_once(stack: Stack, e2e: Run) -> None:
    """The adapter listing shows what the gate judged; a later job reuses the base's figures."""
    http = stack.api.http
    (adapter,) = adapter_listing(http, e2e.user_id, e2e.headers)["data"]
    gate = adapter["gate"]
    assert gate == e2e.final["gate"] and gate["passed"] is True and gate["reason"] is None
    assert (gate["mc_questions"], gate["gate_prompts"], gate["retention_z"]) == (2, 2, 2.0)
    assert 0 <= gate["base_accuracy"] <= 1 and 0 <= gate["adapter_accuracy"] <= 1
    assert gate["retention_delta"] == pytest.approx(
        gate["adapter_accuracy"] - gate["base_accuracy"]
    )
    assert gate["retention_stderr"] >= 0
    assert gate["retention_threshold"] == min(-2 * gate["retention_stderr"], -0.02)
    assert 0 <= gate["degenerate_fraction"] <= gate["max_degenerate_fraction"]
    assert gate["max_degenerate_fraction"] == gate["base_degenerate_fraction"] + 0.25
    retention = adapter["metrics"]["retention"]
    assert retention["questions"] == 2 and retention["fluency"]["prompts"] == 2
    assert retention["fluency"]["nll_bound"] > retention["fluency"]["base_mean_nll"] > 0
    assert "base_computed" not in json.dumps(adapter)  # cache warmth is not a user's fact
    # The first job gated on this fresh database measured the base; the next one reuses it:
    # the gate's questions and prompts are all cache hits (operator counters).
    before = cache_lookups(http)
    user_id, headers = stack.api.create_user("gate-second")
    post_pairs(http, user_id, headers)
    second = train_and_wait(http, user_id, headers)
    assert second["status"] == "succeeded", second["error"]
    after = cache_lookups(http)
    misses = after[("gate_baseline", "miss")] - before[("gate_baseline", "miss")]
    hits = after[("gate_baseline", "hit")] - before[("gate_baseline", "hit")]
    assert (misses, hits) == (0, 4)  # the gate's 2 MC questions + 2 prompts
    again = second["metrics"]["retention"]
    assert again["base"] == retention["base"]  # the same cached outcomes
    with transaction(app_state(stack.server.app).session_factory) as session:
        keys = session.scalars(
            select(BaseResponse.cache_key).where(BaseResponse.cache_key.like("gate-%"))
        ).all()
    assert sorted(key.split(":")[0] for key in keys) == ["gate-answer"] * 2 + ["gate-mc"] * 2


def test_second_trigger_returns_the_active_job(e2e: Run) -> None:
    assert e2e.second_triggers, "no second trigger happened while the job was active"
    for status_code, body in e2e.second_triggers:
        assert status_code == 200 and body["id"] == e2e.job_id


def test_duplicate_task_messages_do_not_train_twice(stack: Stack, e2e: Run) -> None:
    late = producer(stack.settings).send_task(TRAIN_TASK, args=[e2e.job_id], queue="gpu")
    task_ids = [*e2e.duplicate_task_ids, late.id]
    wait_for(
        lambda: all(f"{t}] succeeded" in stack.gpu.log() for t in task_ids),
        60,
        "the duplicate messages to be handled",
    )
    for task_id in task_ids:
        line = next(x for x in stack.gpu.log().splitlines() if f"{task_id}] succeeded" in x)
        assert "'not_claimed'" in line, line
    job = get_job(stack.api.http, e2e.user_id, e2e.job_id, e2e.headers)
    assert job["attempts"] == 1 and job["adapter_version"] == 1
    steps = events(stack.api.http, e2e.user_id, e2e.job_id, e2e.headers, kind="step")
    assert len(steps) == 2
    assert version_folders(stack.settings.adapters_path, e2e.user_id) == ["v1"]


def test_cancel_queued_and_running_jobs(stack: Stack) -> None:
    stack.ensure_gpu_worker()
    http = stack.api.http
    long_id, long_headers = stack.api.create_user("cancel-running")
    queued_id, queued_headers = stack.api.create_user("cancel-queued")
    post_pairs(http, long_id, long_headers)
    post_pairs(http, queued_id, queued_headers)
    body = {"hyperparameters": LONG_TRAINING}
    running = http.post(f"/users/{long_id}/train", json=body, headers=long_headers).json()
    queued = http.post(f"/users/{queued_id}/train", json={}, headers=queued_headers).json()
    wait_for(
        lambda: events(http, long_id, running["id"], long_headers, kind="step"),
        JOB_TIMEOUT_S,
        "a training step of the long job",
    )

    # The only training worker is busy: the other job is still queued and cancels at once.
    skipped_before = stack.gpu.log().count("'not_claimed'")
    assert get_job(http, queued_id, queued["id"], queued_headers)["status"] == "queued"
    cancelled = http.post(
        f"/users/{queued_id}/train/jobs/{queued['id']}/cancel", headers=queued_headers
    )
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"

    response = http.post(
        f"/users/{long_id}/train/jobs/{running['id']}/cancel", headers=long_headers
    )
    assert response.status_code == 200, response.text
    assert response.json()["cancel_requested"] is True
    job = wait_status(http, long_id, running["id"], long_headers, {"cancelled"}, 60)
    assert job["finished_at"] and job["adapter_version"] is None
    steps = events(http, long_id, running["id"], long_headers, kind="step")
    assert 1 <= len(steps) < LONG_TRAINING["max_steps"]
    assert version_folders(stack.settings.adapters_path, long_id) == []
    wait_for(
        lambda: hidden_entries(stack.settings.adapters_path, long_id) == [],
        10,
        "the staging folder to be removed",
    )
    # The cancelled queued job's message is handled without running it.
    wait_for(
        lambda: stack.gpu.log().count("'not_claimed'") > skipped_before,
        60,
        "the queued job's message",
    )
    assert get_job(http, queued_id, queued["id"], queued_headers)["attempts"] == 0
    again = http.post(f"/users/{long_id}/train/jobs/{running['id']}/cancel", headers=long_headers)
    assert again.status_code == 200 and again.json()["status"] == "cancelled"


def test_beat_schedules_a_due_user(stack: Stack) -> None:
    http = stack.api.http
    user_id, headers = stack.api.create_user("scheduled")
    post_pairs(http, user_id, headers, count=STACK_SETTINGS["retrain_min_new_pairs"])

    def scheduled_job() -> dict[str, Any] | None:
        jobs = http.get(f"/users/{user_id}/train/jobs", headers=headers).json()["data"]
        return jobs[0] if jobs else None

    job = wait_for(scheduled_job, 60, "the scheduler to create a job")
    assert job["trigger"] == "schedule" and job["pair_count"] == 6
    http.post(f"/users/{user_id}/train/jobs/{job['id']}/cancel", headers=headers)
    wait_status(http, user_id, job["id"], headers, {"cancelled"}, 60)
    assert len(http.get(f"/users/{user_id}/train/jobs", headers=headers).json()["data"]) == 1


def _training(
    stack: Stack, user_id: str, job_id: str, headers: dict[str, str], attempt: int
) -> bool:
    """True once the job runs this attempt and has made a training step."""
    job = get_job(stack.api.http, user_id, job_id, headers)
    return job["status"] == "running" and job["attempts"] == attempt and job["progress"] > 0


def test_warm_shutdown_puts_the_running_job_back_in_the_queue(stack: Stack) -> None:
    stack.ensure_gpu_worker()
    http = stack.api.http
    user_id, headers = stack.api.create_user("shutdown")
    post_pairs(http, user_id, headers)
    body = {"hyperparameters": LONG_TRAINING}
    job_id = http.post(f"/users/{user_id}/train", json=body, headers=headers).json()["id"]
    wait_for(lambda: _training(stack, user_id, job_id, headers, 1), JOB_TIMEOUT_S, "training")
    stack.gpu.stop(timeout=60)  # SIGTERM: Celery's warm shutdown
    assert stack.gpu.process is not None and stack.gpu.process.returncode == 0
    job = get_job(http, user_id, job_id, headers)
    assert (job["status"], job["attempts"], job["phase"]) == ("queued", 0, "requeued")
    assert events(http, user_id, job_id, headers, "status")[-1]["data"]["message"] == (
        "worker shutting down"
    )
    assert version_folders(stack.settings.adapters_path, user_id) == []
    assert hidden_entries(stack.settings.adapters_path, user_id) == []
    stack.start_gpu_worker()  # the re-sent message runs it again
    wait_status(http, user_id, job_id, headers, {"running"}, JOB_TIMEOUT_S)
    http.post(f"/users/{user_id}/train/jobs/{job_id}/cancel", headers=headers)
    wait_status(http, user_id, job_id, headers, {"cancelled"}, 60)


def test_killed_worker_job_is_requeued_then_failed_and_never_published(stack: Stack) -> None:
    stack.ensure_gpu_worker()
    http, adapters = stack.api.http, stack.settings.adapters_path
    user_id, headers = stack.api.create_user("killed")
    post_pairs(http, user_id, headers)
    job_id = http.post(
        f"/users/{user_id}/train", json={"hyperparameters": LONG_TRAINING}, headers=headers
    ).json()["id"]

    def kill_during_training(attempt: int) -> None:
        wait_for(
            lambda: _training(stack, user_id, job_id, headers, attempt),
            JOB_TIMEOUT_S,
            f"attempt {attempt} to train",
        )
        stack.gpu.kill()
        assert version_folders(adapters, user_id) == []

    kill_during_training(1)
    bound = STACK_SETTINGS["job_stale_after_s"] + 20
    job = wait_status(http, user_id, job_id, headers, {"queued"}, bound)  # requeued by the reaper
    assert job["attempts"] == 1
    wait_for(lambda: hidden_entries(adapters, user_id) == [], 10, "staging cleaned")

    stack.start_gpu_worker()  # picks up the re-sent message: attempt 2
    kill_during_training(2)
    job = wait_status(http, user_id, job_id, headers, {"failed"}, bound)
    assert job["attempts"] == 2 and "lost" in job["error"]
    listing = http.get(f"/users/{user_id}/adapters", headers=headers).json()
    assert listing["data"] == [] and listing["active_version"] is None
    assert version_folders(adapters, user_id) == []
    wait_for(lambda: hidden_entries(adapters, user_id) == [], 10, "staging cleaned")
    stack.start_gpu_worker()


def test_bad_data_fails_the_job_with_its_message_and_is_not_retried(stack: Stack) -> None:
    stack.ensure_gpu_worker()
    http = stack.api.http
    user_id, headers = stack.api.create_user("bad-data")
    post_pairs(http, user_id, headers)
    job_id = job_service.new_job_id()
    # a row the API refuses
    with transaction(app_state(stack.server.app).session_factory) as session:
        last = session.scalar(
            select(func.max(PreferencePair.id)).where(PreferencePair.user_id == user_id)
        )
        session.add(
            TrainingJob(
                id=job_id,
                user_id=user_id,
                status="queued",
                method="bapo",
                hyperparameters={**TINY_TRAINING, "lora_rank": 7},
                trigger="api",
                pair_count=4,
                last_pair_id=last,
            )
        )
    task = producer(stack.settings).send_task(TRAIN_TASK, args=[job_id], queue="gpu")
    job = wait_status(http, user_id, job_id, headers, {"failed"}, 120)
    assert "lora_rank must be one of" in job["error"] and job["attempts"] == 1
    wait_for(lambda: f"{task.id}] raised unexpected" in stack.gpu.log(), 30, "the task failure")
    assert f"Task {TRAIN_TASK}[{task.id}] retry" not in stack.gpu.log()
    assert get_job(http, user_id, job_id, headers)["attempts"] == 1


def test_readyz_checks_the_broker(stack: Stack) -> None:
    response = stack.api.http.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json()["checks"]["broker"] == {"ok": True, "detail": "ok"}
