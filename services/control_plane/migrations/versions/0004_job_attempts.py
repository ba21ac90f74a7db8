"""Jobs count their Ray submissions (attempt) and the log lines of earlier attempts (log_base): a job whose
driver died is resubmitted from its last checkpoint, and its log numbering goes on across attempts.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 04:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:  # batch: SQLite cannot ALTER most things in place
        batch.add_column(sa.Column("attempt", sa.Integer(), server_default="1", nullable=False))
        batch.add_column(sa.Column("log_base", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("log_base")
        batch.drop_column("attempt")
