"""Version floors for every issued version: backfill them from the adapters already recorded.

From this revision on, issuing an adapter version raises the user id's floor, so a GC (or any
other deletion of adapter rows) can never make a version number, and its serving name, come back.
Versions recorded before it get their floor here.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

LATEST = "SELECT MAX(a.version) FROM adapters a WHERE a.user_id = adapter_version_floors.user_id"


def upgrade() -> None:
    op.execute(
        sa.text(
            "INSERT INTO adapter_version_floors (user_id, last_version) "
            "SELECT user_id, MAX(version) FROM adapters "
            "WHERE user_id NOT IN (SELECT user_id FROM adapter_version_floors) "
            "GROUP BY user_id"
        )
    )
    op.execute(
        sa.text(
            f"UPDATE adapter_version_floors SET last_version = ({LATEST}) "
            f"WHERE last_version < ({LATEST})"
        )
    )


def downgrade() -> None:
    """Nothing to undo: higher floors only keep names unique."""
