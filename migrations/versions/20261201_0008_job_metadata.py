"""Training jobs get `metadata`: the key-value labels a client attaches to a fine-tuning job.

`POST /v1/fine_tuning/jobs` accepts OpenAI's `metadata` (up to 16 string pairs) and returns it on
every read of the job; jobs started otherwise have none (NULL).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("training_jobs") as batch:
        batch.add_column(sa.Column("metadata", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("training_jobs") as batch:
        batch.drop_column("metadata")
