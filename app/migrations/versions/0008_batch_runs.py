"""Batch runs: one row per population run over a FHIR Bulk Data export (``app/batch/runs.py``).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "batch_runs",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("service", sa.Text, nullable=False),
        sa.Column("client_iss", sa.Text, nullable=False),
        sa.Column("fhir_server", sa.Text, nullable=False),
        sa.Column("group_id", sa.Text, nullable=True),
        sa.Column("since", sa.Text, nullable=True),
        sa.Column("write_back", sa.Boolean, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("note", sa.Text, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("exports", sa.Integer, nullable=False),
        sa.Column("status_url", sa.Text, nullable=True),
        sa.Column("type_filtered", sa.Boolean, nullable=True),
        sa.Column("manifest", sa.JSON, nullable=True),
        sa.Column("transaction_time", sa.Text, nullable=True),
        sa.Column("plan", sa.JSON, nullable=True),
        sa.Column("summary", sa.JSON, nullable=True),
        sa.Column("times", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_batch_runs_created", "batch_runs", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_batch_runs_created", table_name="batch_runs")
    op.drop_table("batch_runs")
