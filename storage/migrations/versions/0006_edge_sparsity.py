"""circuits.edge_sparsity

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05

The circuit's sparsity column takes the API's name (``Circuit.edge_sparsity``), as edge_count and
total_edge_count did in 0004.
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# SQLite copies the table in batch mode: the copy keeps AUTOINCREMENT (ids of deleted circuits
# are never handed out again).
_KEEP_AUTOINCREMENT = {"sqlite_autoincrement": True}


def upgrade() -> None:
    with op.batch_alter_table("circuits", table_kwargs=_KEEP_AUTOINCREMENT) as batch:
        batch.alter_column("sparsity", new_column_name="edge_sparsity")


def downgrade() -> None:
    with op.batch_alter_table("circuits", table_kwargs=_KEEP_AUTOINCREMENT) as batch:
        batch.alter_column("edge_sparsity", new_column_name="sparsity")
