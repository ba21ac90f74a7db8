"""Jobs record the trainer's parameter counts (trainable and total), from its `params` event.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 02:10:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:  # batch: SQLite cannot ALTER most things in place
        batch.add_column(sa.Column("trainable_params", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("total_params", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("total_params")
        batch.drop_column("trainable_params")
