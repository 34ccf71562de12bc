"""The ledger at depth: indexes for every hot query, and job counts kept by triggers instead of GROUP BY.

Every claim, sweep, expiry, dead letter listing and purge reads an index in order. Counts per (kind, state)
live in ``job_counts``; triggers append every change to ``job_count_changes``, which workers fold into the
counts once a second, so neither a write nor a read of the counts contends on one row or scans the history.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

INDEXES = {
    "ix_jobs_queue": ["state", "run_after", "id"],
    "ix_jobs_queue_by_kind": ["state", "kind", "run_after", "id"],
    "ix_jobs_leases": ["state", "lease_expires_at"],
    "ix_jobs_expiry": ["state", "expires_at"],
    "ix_jobs_state_updated": ["state", "updated_at", "id"],
}

_CHANGE = (
    "INSERT INTO job_count_changes (kind, state, jobs, attempts) "
    "VALUES ({who}.kind, {who}.state, {sign}1, {sign}{who}.attempts)"
)
_COUNTED = "OLD.kind IS NOT NEW.kind OR OLD.state IS NOT NEW.state OR OLD.attempts IS NOT NEW.attempts"

SQLITE_TRIGGERS = [
    f"CREATE TRIGGER jobs_counted_insert AFTER INSERT ON jobs BEGIN {_CHANGE.format(who='NEW', sign='')}; END",
    f"CREATE TRIGGER jobs_counted_update AFTER UPDATE OF kind, state, attempts ON jobs WHEN {_COUNTED} BEGIN "
    f"{_CHANGE.format(who='OLD', sign='-')}; {_CHANGE.format(who='NEW', sign='')}; END",
    f"CREATE TRIGGER jobs_counted_delete AFTER DELETE ON jobs BEGIN {_CHANGE.format(who='OLD', sign='-')}; END",
]

POSTGRES_TRIGGERS = [
    f"""CREATE FUNCTION jobs_count_change() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF TG_OP IN ('UPDATE', 'DELETE') THEN {_CHANGE.format(who="OLD", sign="-")}; END IF;
      IF TG_OP IN ('INSERT', 'UPDATE') THEN {_CHANGE.format(who="NEW", sign="")}; END IF;
      RETURN NULL;
    END $$""",
    "CREATE TRIGGER jobs_counted AFTER INSERT OR DELETE ON jobs FOR EACH ROW EXECUTE FUNCTION jobs_count_change()",
    "CREATE TRIGGER jobs_counted_update AFTER UPDATE OF kind, state, attempts ON jobs FOR EACH ROW "
    f"WHEN ({_COUNTED.replace('IS NOT', 'IS DISTINCT FROM')}) EXECUTE FUNCTION jobs_count_change()",
]


def upgrade() -> None:
    op.drop_index("ix_jobs_state_run_after", table_name="jobs")
    for name, columns in INDEXES.items():
        op.create_index(name, "jobs", columns)
    op.create_table(
        "job_counts",
        sa.Column("kind", sa.Text, primary_key=True),
        sa.Column("state", sa.Text, primary_key=True),
        sa.Column("jobs", sa.BigInteger, nullable=False),
        sa.Column("attempts", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "job_count_changes",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("jobs", sa.Integer, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
    )
    op.execute(
        "INSERT INTO job_counts (kind, state, jobs, attempts) "
        "SELECT kind, state, count(*), coalesce(sum(attempts), 0) FROM jobs GROUP BY kind, state"
    )
    postgres = op.get_bind().dialect.name == "postgresql"
    for statement in POSTGRES_TRIGGERS if postgres else SQLITE_TRIGGERS:
        op.execute(statement)
    if postgres:  # every row is deleted within a second of being written: vacuum and analyze it often
        op.execute(
            "ALTER TABLE job_count_changes SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = "
            "10000, autovacuum_analyze_scale_factor = 0, autovacuum_analyze_threshold = 10000)"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER jobs_counted_update ON jobs")
        op.execute("DROP TRIGGER jobs_counted ON jobs")
        op.execute("DROP FUNCTION jobs_count_change()")
    else:
        for name in ("jobs_counted_insert", "jobs_counted_update", "jobs_counted_delete"):
            op.execute(f"DROP TRIGGER {name}")
    op.drop_table("job_count_changes")
    op.drop_table("job_counts")
    for name in INDEXES:
        op.drop_index(name, table_name="jobs")
    op.create_index("ix_jobs_state_run_after", "jobs", ["state", "run_after"])
