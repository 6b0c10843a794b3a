"""Training jobs get `training_file`: the stored file (`file-…`) a fine-tuning job imported.

`POST /v1/fine_tuning/jobs` with a `training_file` imports that file's pairs into the user's
feedback (once per file content) and then creates the job; the job remembers the file id so that
OpenAI's job object can show it. Jobs started otherwise have none (NULL).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("training_jobs") as batch:
        batch.add_column(sa.Column("training_file", sa.String(40), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("training_jobs") as batch:
        batch.drop_column("training_file")
