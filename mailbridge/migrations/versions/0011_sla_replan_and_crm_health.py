"""sla re-planning and CRM health

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01 12:40:00

* sla_cursor.settings_digest: the SLA settings the open tickets are planned under; a change re-plans them;
* crm_health: when the CRM last answered and last failed, and how many tickets were flagged because it
  could not say who the customer is (`mailbridge status`); its one row is made here, so that two
  instances only ever update it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import mailbridge.models

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sla_cursor", schema=None) as batch_op:
        batch_op.add_column(sa.Column("settings_digest", sa.String(length=64), nullable=True))
    crm_health = op.create_table(
        "crm_health",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("last_success_at", mailbridge.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_failure_at", mailbridge.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_problem", sa.Text(), nullable=True),
        sa.Column("flagged_tickets", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("last_flagged_at", mailbridge.models.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("name"),
    )
    op.bulk_insert(crm_health, [{"name": "crm", "flagged_tickets": 0}])


def downgrade() -> None:
    op.drop_table("crm_health")
    with op.batch_alter_table("sla_cursor", schema=None) as batch_op:
        batch_op.drop_column("settings_digest")
