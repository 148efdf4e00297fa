"""circuit imports

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05

Circuits can be imported (ImportCircuit) as well as found by jobs; an import carries a
caller-scoped request_id, so a retried import returns the circuit the first one stored. Rows
stored before this revision have none.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


# A unique constraint makes SQLite copy the table: the copy keeps AUTOINCREMENT (ids of
# deleted circuits are never handed out again).
_KEEP_AUTOINCREMENT = {"sqlite_autoincrement": True}


def upgrade() -> None:
    with op.batch_alter_table("circuits", table_kwargs=_KEEP_AUTOINCREMENT) as batch:
        batch.add_column(sa.Column("request_id", sa.String(length=255), nullable=True))
        batch.create_unique_constraint(op.f("uq_circuits_owner_request_id"),
                                       ["owner", "request_id"])


def downgrade() -> None:
    with op.batch_alter_table("circuits", table_kwargs=_KEEP_AUTOINCREMENT) as batch:
        batch.drop_constraint(op.f("uq_circuits_owner_request_id"), type_="unique")
        batch.drop_column("request_id")
