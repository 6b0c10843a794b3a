"""Running one training job: claim → pairs → train (BAPO engine) → retention gate → publish.

Publishing: the engine writes the adapter completely into a hidden staging folder of the user's
adapter store (foundation.adapter_store); in the transaction that records it, the folder is renamed
to `v<N>` (atomic on one filesystem) just before the commit. A crash before the rename leaves only a
hidden folder (the reaper deletes it); a crash between rename and commit leaves an unrecorded `v<N>`
that is never listed nor loaded (adapters are listed from the database) and is replaced by the next
publish.

The engine (and torch) is imported inside the functions that need it: the worker starts fast and
the maintenance tasks never load it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.core.config import Settings
from app.core.db import transaction
from app.services import job_leases
from app.services import jobs as job_service
from foundation.model import prepare_base_model
from foundation.pairs import Pair, prompt_hash
from foundation.train_config import TrainConfig
from worker.caches import base_response_cache, reference_logprob_cache
from worker.gate import GateVerdict, anchor_allowance, gate_verdict, measure_retention
from worker.jobs import JobStopped, RunningJob, finite, is_transient, session_factory
from worker.servable import check_servable

if TYPE_CHECKING:
    from worker.training.trainer import TrainResult

log = logging.getLogger(__name__)


class JobDataError(ValueError):
    """The job cannot train on what it has (too few pairs left): failed, never retried."""


def run_training_job(job_id: str, worker_id: str, settings: Settings) -> str:
    """Claim the job and run it to an end; returns the outcome (`not_claimed` for a duplicate)."""
    factory = session_factory(settings)
    with transaction(factory) as session:
        claim = job_leases.claim_job(session, job_id, worker_id)
    if claim is None:
        log.info("job %s is not queued (duplicate or redelivered message): nothing to do", job_id)
        return "not_claimed"
    log.info("job %s claimed by %s (attempt %d)", job_id, worker_id, claim.attempt)
    job = RunningJob(factory, settings, claim)
    with job.heartbeat():
        return _run_claimed(job)


def _run_claimed(job: RunningJob) -> str:
    """Run a claimed job and record how it ended; non-transient errors are re-raised."""
    from worker.training.trainer import TrainingCancelled

    claim, store = job.claim, job.settings.adapter_store
    staging = store.staging_folder(claim.user_id, claim.job_id, claim.attempt)
    try:
        version = _train_gate_publish(job, staging)
        log.info("job %s succeeded: adapter v%d", job.claim.job_id, version)
        return "succeeded"
    except (TrainingCancelled, JobStopped):
        return _record_stop(job)
    except Exception as exc:
        if is_transient(exc):
            return _release_for_retry(job, exc)
        _record_failure(job, exc)
        raise
    finally:
        store.remove_staging(staging)


def _train_gate_publish(job: RunningJob, staging: Path) -> int:
    """The job's work; returns the published adapter version."""
    from worker.training.trainer import train

    job.on_phase("loading_pairs")
    pairs = _load_pairs(job)
    config = _train_config(job)
    job.total_steps = _planned_steps(pairs, config)
    job.on_phase("preparing_model")
    model_path = prepare_base_model(job.settings.data_dir, job.settings.base_model)
    job.settings.adapter_store.remove_staging(staging)  # leftovers of a crashed run of this attempt
    result = train(
        model_path,
        pairs,
        config,
        out_dir=staging,
        base_cache=base_response_cache(job.factory),
        ref_cache=reference_logprob_cache(job.factory),
        on_step=job.on_step,
        on_phase=job.on_phase,
        should_cancel=job.should_stop,
        served_model_name=job.settings.served_model_name,
    )
    check_servable(job.settings, staging)  # before the gate: a refused adapter fails at once
    job.on_phase("gate")
    measures = measure_retention(job.settings, job.factory, model_path, staging)
    verdict = gate_verdict(
        job.settings, measures, anchor_logratio(result), anchor_allowance(config)
    )
    job.on_phase("publishing")
    return publish(job, staging, job_metrics(result, measures.to_json(), verdict), verdict)


def _load_pairs(job: RunningJob) -> list[Pair]:
    """The job's pairs as engine pairs; too few left (deleted since) is a data error.

    The rows' prompt_hash column is not carried over: the engine hashes the text (app/models.py).
    """
    with transaction(job.factory) as session:
        rows = job_leases.job_pairs(session, job.claim)
        pairs = [
            Pair(messages=list(r.messages), chosen=r.chosen, rejected=r.rejected) for r in rows
        ]
    minimum = job.settings.min_pairs_to_train
    if len(pairs) < minimum:
        raise JobDataError(f"only {len(pairs)} of the job's pairs remain; training needs {minimum}")
    return pairs


def _train_config(job: RunningJob) -> TrainConfig:
    """The job's stored hyperparameters."""
    with transaction(job.factory) as session:
        stored = dict(
            job_service.get_job(session, job.claim.user_id, job.claim.job_id).hyperparameters
        )
    # Jobs stored before served_model_name became a setting (passed to train() above, not a
    # hyperparameter) carry it among their hyperparameters: ignore it.
    stored.pop("served_model_name", None)
    return TrainConfig.parse(stored)


def _planned_steps(pairs: list[Pair], config: TrainConfig) -> int:
    """Optimizer steps the engine will run (for the progress fraction)."""
    from worker.training.trainer import split_heldout, total_steps

    groups = [prompt_hash(pair.messages) for pair in pairs]
    train_idx, _ = split_heldout(len(pairs), config, groups)
    return total_steps(len(train_idx), config)


# --- the retention gate (measured and decided in worker.gate) ------------------------------------


def anchor_logratio(result: TrainResult) -> float | None:
    """Mean log-ratio of the base responses over all pairs (train and held-out)."""
    parts = [
        (result.metrics.get(f"{split}_anchor_logratio"), count)
        for split, count in (
            ("train", result.num_train_pairs),
            ("heldout", result.num_heldout_pairs),
        )
    ]
    known = [(float(value), count) for value, count in parts if value is not None and count]
    total = sum(count for _, count in known)
    return sum(value * count for value, count in known) / total if total else None


# --- publishing -----------------------------------------------------------------------------------


def job_metrics(
    result: TrainResult, retention: dict[str, Any], verdict: GateVerdict
) -> dict[str, Any]:
    """Final metrics of the job and its adapter (per-step metrics are in the job's events).

    No cache statistics: whether the shared caches already held this user's prompts and answers
    would tell them what other users sent (the totals are in `cache_lookups`, for /metrics).
    """
    summary = result.to_json()
    for key in ("adapter_dir", "history", "config", "metrics", "cache_stats"):
        summary.pop(key, None)
    return finite({**result.metrics, **summary, "retention": retention, "gate": asdict(verdict)})


def publish(job: RunningJob, staging: Path, metrics: dict[str, Any], verdict: GateVerdict) -> int:
    """Rename staging → v<N>, record the adapter (active if the gate passed), finish the job."""
    from app.services.adapters import publish_adapter

    claim = job.claim
    with transaction(job.factory) as session:
        job_row = job_leases.hold_claim(session, claim)
        if job_row is None:
            job.lost = True
            raise JobStopped("lost")
        job.check_stop()
        adapter = publish_adapter(  # complete before it is recorded; see the module docstring
            session,
            job.settings.adapter_store,
            claim.user_id,
            staging,
            job_id=claim.job_id,
            method=job_row.method,
            metrics=metrics,
            gate_passed=verdict.passed,
            gate_reason=verdict.reason,
        )
        job_service.add_event(session, claim.job_id, "gate", finite(asdict(verdict)))
        job_leases.finish_job(
            session, claim, "succeeded", metrics=metrics, adapter_version=adapter.version
        )
    return adapter.version


# --- how a run ends otherwise ---------------------------------------------------------------------


def _record_stop(job: RunningJob) -> str:
    """Record a stop between steps: cancelled, time limit (failed), or shutdown (back to queue)."""
    reason = job.stop_reason() or "cancelled"
    claim, settings = job.claim, job.settings
    with transaction(job.factory) as session:
        if reason == "lost":
            outcome = "lost"
        elif reason == "cancelled":
            job_leases.finish_job(session, claim, "cancelled", error=None)
            outcome = "cancelled"
        elif reason == "time_limit":
            job_leases.finish_job(
                session,
                claim,
                "failed",
                error=(
                    f"time limit exceeded: the job ran longer than {settings.job_time_limit_s}s "
                    "(JOB_TIME_LIMIT_S)"
                ),
            )
            outcome = "failed"
        else:
            outcome = job_leases.release_job(
                session, settings, claim, "worker shutting down", count_attempt=False
            )
    log.info("job %s stopped (%s): %s", claim.job_id, reason, outcome)
    return outcome


def _release_for_retry(job: RunningJob, exc: BaseException) -> str:
    """A transient infrastructure error: back to the queue after a delay (bounded by attempts)."""
    message = f"transient error, retrying: {type(exc).__name__}: {exc}"[:2000]
    log.warning("job %s: %s", job.claim.job_id, message)
    with transaction(job.factory) as session:
        outcome = job_leases.release_job(
            session, job.settings, job.claim, message, delay_s=job.settings.job_retry_delay_s
        )
    return f"retry_{outcome}"


def _record_failure(job: RunningJob, exc: BaseException) -> None:
    """The job failed for good; the message says why (Celery logs the traceback)."""
    error = f"{type(exc).__name__}: {exc}"[:4000]
    log.error("job %s failed: %s", job.claim.job_id, error)
    with transaction(job.factory) as session:
        job_leases.finish_job(session, job.claim, "failed", error=error)
