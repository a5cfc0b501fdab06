"""merged tickets redirect: tickets.merged_into_id

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 10:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        # SQLite adds a column with its REFERENCES clause in place; Alembic's batch mode would copy the table
        # and drop the old one, which foreign keys on (rows of other tables refer to it) do not allow.
        op.execute("ALTER TABLE tickets ADD COLUMN merged_into_id INTEGER REFERENCES tickets (id)")
    else:
        op.add_column("tickets", sa.Column("merged_into_id", sa.Integer(), nullable=True))
        op.create_foreign_key("fk_tickets_merged_into_id", "tickets", "tickets", ["merged_into_id"], ["id"])

    # Tickets merged before this revision: `tickets merge` linked them to the ticket they went into and
    # left a "merged_into" event naming it on them.
    op.execute(
        "UPDATE tickets SET merged_into_id = linked_ticket_id WHERE linked_ticket_id IS NOT NULL AND EXISTS ("
        " SELECT 1 FROM ticket_events e JOIN tickets survivor ON survivor.id = tickets.linked_ticket_id"
        " WHERE e.ticket_id = tickets.id AND e.kind = 'merged_into' AND e.new = survivor.number)"
    )


def downgrade() -> None:
    with op.batch_alter_table("tickets", schema=None) as batch_op:
        batch_op.drop_column("merged_into_id")
