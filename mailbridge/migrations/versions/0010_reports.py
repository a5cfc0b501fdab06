"""reports: indexes for the help-desk reports

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01 10:10:00

* tickets(created_at): the tickets opened in a period are a range of the index, not a scan of every
  ticket ever (a month out of years of history); the report reads them by the range of their ids,
  which it takes from this index alone;
* tickets(closed_at, queue, mailbox, owner): the tickets closed in a period, per queue, mailbox and
  owner and per hour, from the index alone (closed tickets are scattered over the table);
* tickets(status, created_at): the backlog (every ticket not closed, by status and age) is read from the
  index alone;
* ticket_events(kind, new, old, ticket_id): the status changes back to open (reopens) are a range of
  the index, not a scan of the whole history.
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tickets", schema=None) as batch_op:
        batch_op.create_index("ix_tickets_created_at", ["created_at"], unique=False)
        batch_op.create_index("ix_tickets_closed_at", ["closed_at", "queue", "mailbox", "owner"], unique=False)
        batch_op.create_index("ix_tickets_status_created_at", ["status", "created_at"], unique=False)
    with op.batch_alter_table("ticket_events", schema=None) as batch_op:
        batch_op.create_index("ix_ticket_events_kind_new_old", ["kind", "new", "old", "ticket_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("ticket_events", schema=None) as batch_op:
        batch_op.drop_index("ix_ticket_events_kind_new_old")
    with op.batch_alter_table("tickets", schema=None) as batch_op:
        batch_op.drop_index("ix_tickets_status_created_at")
        batch_op.drop_index("ix_tickets_closed_at")
        batch_op.drop_index("ix_tickets_created_at")
