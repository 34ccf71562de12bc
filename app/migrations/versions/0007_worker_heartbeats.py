"""Worker heartbeats: one row per job worker process, kept alive while it runs (``app/jobs/presence.py``).

``/readyz`` and ``gateway_workers_live`` count the rows whose ``live_until`` has not passed; a clean stop sets
``stopped_at``; workers purge rows a day after they stopped or went stale.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_workers",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("kinds", sa.JSON, nullable=False),
        sa.Column("threads", sa.Integer, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("live_until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("jobs_run", sa.BigInteger, nullable=False),
        sa.Column("jobs_failed", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_job_workers_live_until", "job_workers", ["live_until"])


def downgrade() -> None:
    op.drop_index("ix_job_workers_live_until", table_name="job_workers")
    op.drop_table("job_workers")
