"""instances: several daemons on one database (mailbox leases, outbox claims)

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-01 12:45:00

* instances: each running daemon and until when it counts as alive (the fair share of mailboxes);
* mailbox_leases: which instance fetches a mailbox, until when (taken over once it runs out);
* outbox.claimed_by / claimed_until: which sender has taken a mail to deliver it (another instance's
  sender claims it only once the claim has run out).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "instances",
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("alive_until", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "mailbox_leases",
        sa.Column("mailbox", sa.String(200), primary_key=True),
        sa.Column("holder", sa.String(200), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=True),
    )
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.add_column(sa.Column("claimed_by", sa.String(200), nullable=True))
        batch_op.add_column(sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_column("claimed_until")
        batch_op.drop_column("claimed_by")
    op.drop_table("mailbox_leases")
    op.drop_table("instances")
