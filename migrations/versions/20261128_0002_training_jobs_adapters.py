"""Training jobs, their events, adapters, the user's active adapter, and the engine caches.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
ACTIVE = sa.text("status IN ('queued', 'running')")


def _user_fk() -> sa.Column:
    return sa.Column(
        "user_id", sa.String(64), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False
    )


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("active_adapter_version", sa.Integer(), nullable=True))
    op.create_table(
        "training_jobs",
        sa.Column("id", sa.String(40), primary_key=True),
        _user_fk(),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("hyperparameters", sa.JSON(), nullable=False),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("pair_count", sa.Integer(), nullable=False),
        sa.Column("last_pair_id", sa.Integer(), nullable=True),
        sa.Column("phase", sa.String(32), nullable=True),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("worker_id", sa.String(255), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("adapter_version", sa.Integer(), nullable=True),
        sa.Column("request_id", sa.String(64), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("heartbeat_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
    )
    op.create_index("ix_training_jobs_status", "training_jobs", ["status"])
    op.create_index(
        "ix_training_jobs_user_id_created_at", "training_jobs", ["user_id", "created_at"]
    )
    # One queued/running job per user, enforced by the database (partial unique index).
    op.create_index(
        "uq_training_jobs_one_active_per_user",
        "training_jobs",
        ["user_id"],
        unique=True,
        postgresql_where=ACTIVE,
        sqlite_where=ACTIVE,
    )
    op.create_table(
        "job_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "job_id",
            sa.String(40),
            sa.ForeignKey("training_jobs.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("step", sa.Integer(), nullable=True),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index("ix_job_events_job_id_id", "job_events", ["job_id", "id"])
    op.create_table(
        "adapters",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        _user_fk(),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("job_id", sa.String(40), nullable=True),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("gate_passed", sa.Boolean(), nullable=False),
        sa.Column("gate_reason", sa.Text(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("user_id", "version", name="uq_adapters_user_version"),
    )
    op.create_table(
        "base_responses",
        sa.Column("cache_key", sa.String(255), primary_key=True),
        sa.Column("response", sa.Text(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_table(
        "reference_logprobs",
        sa.Column("cache_key", sa.String(255), primary_key=True),
        sa.Column("logprob", sa.Float(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("reference_logprobs")
    op.drop_table("base_responses")
    op.drop_table("adapters")
    op.drop_index("ix_job_events_job_id_id", "job_events")
    op.drop_table("job_events")
    op.drop_index("uq_training_jobs_one_active_per_user", "training_jobs")
    op.drop_index("ix_training_jobs_user_id_created_at", "training_jobs")
    op.drop_index("ix_training_jobs_status", "training_jobs")
    op.drop_table("training_jobs")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("active_adapter_version")
