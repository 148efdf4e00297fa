"""dataset uploads

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04

A dataset's examples are stored in several short transactions, so one large upload never holds
the write lock for long: `ready` is false until the last one commits (readers never see such a
dataset; the cleanup deletes one an interrupted upload left). `size_bytes` is the uploaded
content's size (until now the service kept it in `source` as "upload:<bytes>"; it moves here).
Rows stored before this revision are ready.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("ready", sa.Boolean(), server_default=sa.true(),
                                   nullable=False))
        batch.add_column(sa.Column("size_bytes", sa.BigInteger(), server_default="0",
                                   nullable=False))
    op.execute("UPDATE datasets SET size_bytes = CAST(substr(source, 8) AS BIGINT), "
               "source = 'upload' WHERE source LIKE 'upload:%'")


def downgrade() -> None:
    op.execute("UPDATE datasets SET source = 'upload:' || CAST(size_bytes AS VARCHAR) "
               "WHERE source = 'upload'")
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("size_bytes")
        batch.drop_column("ready")
