"""QPU seconds are marked by where they come from: a reservation records whether its QPU time was reported by
the provider (IBM usage) or is the time model's estimate, and an account sums the estimated part
(qpu_s_estimated, within qpu_s_spent), so a bill shows what is measured and what is not.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 14:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("budgets") as batch:  # batch: SQLite cannot ALTER most things in place
        batch.add_column(sa.Column("qpu_s_estimated", sa.Float(), server_default="0", nullable=False))
    with op.batch_alter_table("reservations") as batch:
        batch.add_column(sa.Column("qpu_s_reported", sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("reservations") as batch:
        batch.drop_column("qpu_s_reported")
    with op.batch_alter_table("budgets") as batch:
        batch.drop_column("qpu_s_estimated")
