"""Cache lookup counters: how often the shared base-response / reference-log-prob caches hit.

Whether a cache already held a prompt tells a user that someone else sent it, so the figures are
no longer in job or adapter metrics; workers add each lookup's hits and misses here instead and
/metrics exports the totals to the operator. The per-job figures already recorded
(`metrics.cache_stats` of jobs and adapters) are removed.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cache_lookups",
        sa.Column("cache", sa.String(32), primary_key=True),
        sa.Column("hits", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("misses", sa.BigInteger(), nullable=False, server_default="0"),
    )
    for name, key in (("training_jobs", sa.String), ("adapters", sa.Integer)):
        _drop_cache_stats(sa.table(name, sa.column("id", key), sa.column("metrics", sa.JSON)))


def _drop_cache_stats(table: sa.TableClause) -> None:
    """Remove `cache_stats` from every row's metrics (JSON: done row by row, on any database)."""
    conn = op.get_bind()
    rows = conn.execute(sa.select(table.c.id, table.c.metrics).where(table.c.metrics.is_not(None)))
    for row_id, metrics in list(rows):
        if isinstance(metrics, dict) and "cache_stats" in metrics:
            kept = {k: v for k, v in metrics.items() if k != "cache_stats"}
            conn.execute(sa.update(table).where(table.c.id == row_id).values(metrics=kept))


def downgrade() -> None:
    op.drop_table("cache_lookups")
