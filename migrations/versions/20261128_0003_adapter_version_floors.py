"""Adapter version floors: version numbers (and so adapter names) are never reused.

A deleted and re-created user would otherwise start again at v1, and `user-<id>-v1` would name
different weights than an inference server may still hold. The floor outlives the user's rows.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "adapter_version_floors",
        sa.Column("user_id", sa.String(64), primary_key=True),
        sa.Column("last_version", sa.Integer(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("adapter_version_floors")
