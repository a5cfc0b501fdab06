"""postgresql: the SLA planner reads the history in commit order

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01 13:00:00

On PostgreSQL, ids come from a sequence when a row is inserted, not when it is committed: a transaction
that commits late can leave an event with a smaller id than events the planner has already read, and a
cursor on the id alone would skip it for ever. Each event now records the id of the transaction that
wrote it (`xact_id`, filled by the server); the planner reads in (xact_id, id) order and only the events
of transactions older than every transaction still in flight (`pg_snapshot_xmin`), which can no longer
change. SQLite has one writer at a time, so there ids are in commit order and `xact_id` stays NULL.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

CURRENT_XACT_ID = "(pg_current_xact_id()::text::bigint)"


def upgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    with op.batch_alter_table("ticket_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("xact_id", sa.BigInteger(), nullable=True))
        batch_op.create_index("ix_ticket_events_xact_id", ["xact_id", "id"], unique=False)
    with op.batch_alter_table("sla_cursor", schema=None) as batch_op:
        batch_op.add_column(sa.Column("last_xact_id", sa.BigInteger(), nullable=False, server_default="0"))
    if postgresql:
        # The events so far were committed before this migration: all of them come first.
        op.execute("UPDATE ticket_events SET xact_id = 0")
        op.alter_column("ticket_events", "xact_id", server_default=sa.text(CURRENT_XACT_ID))


def downgrade() -> None:
    with op.batch_alter_table("sla_cursor", schema=None) as batch_op:
        batch_op.drop_column("last_xact_id")
    with op.batch_alter_table("ticket_events", schema=None) as batch_op:
        batch_op.drop_index("ix_ticket_events_xact_id")
        batch_op.drop_column("xact_id")
