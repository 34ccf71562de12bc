"""AI results that cards link to: an opaque random id (a SMART link's appContext) and what the page shows.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ai_results",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("client_iss", sa.Text, nullable=True),
        sa.Column("fhir_server", sa.Text, nullable=True),
        sa.Column("patient_id", sa.Text, nullable=True),
        sa.Column("data", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_ai_results_expires_at", "ai_results", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_ai_results_expires_at", table_name="ai_results")
    op.drop_table("ai_results")
