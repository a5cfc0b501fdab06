"""status reconciliation: replies apart on receipts; what the watcher counted in the folder

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 10:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("receipts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reply", sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table("mailbox_state", schema=None) as batch_op:
        batch_op.add_column(sa.Column("waiting", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("missing", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("left_by_existing_mail", sa.BigInteger(), nullable=True))
    # Receipts written before this revision: a stored mail is a reply when its ticket had an earlier article.
    op.execute(
        """
        UPDATE receipts SET reply = true
        WHERE outcome = 'stored' AND article_id IN (
            SELECT later.id FROM articles AS later
            WHERE EXISTS (
                SELECT 1 FROM articles AS earlier WHERE earlier.ticket_id = later.ticket_id AND earlier.id < later.id
            )
        )
        """
    )


def downgrade() -> None:
    with op.batch_alter_table("mailbox_state", schema=None) as batch_op:
        batch_op.drop_column("left_by_existing_mail")
        batch_op.drop_column("missing")
        batch_op.drop_column("waiting")
    with op.batch_alter_table("receipts", schema=None) as batch_op:
        batch_op.drop_column("reply")
