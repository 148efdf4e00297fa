"""owners

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04

Datasets and circuits get the principal that owns them (jobs already record theirs as
`caller`), and datasets a caller-scoped request_id for idempotent uploads. Rows stored before
this revision belong to the empty principal, which only an admin (or a server without
authentication) sees.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("owner", sa.String(length=255), server_default="",
                                   nullable=False))
        batch.add_column(sa.Column("request_id", sa.String(length=255), nullable=True))
        batch.create_unique_constraint(op.f("uq_datasets_owner_request_id"),
                                       ["owner", "request_id"])
    op.create_index("ix_datasets_owner", "datasets", ["owner", "created_at", "id"])
    with op.batch_alter_table("circuits") as batch:
        batch.add_column(sa.Column("owner", sa.String(length=255), server_default="",
                                   nullable=False))
    op.create_index("ix_circuits_owner", "circuits", ["owner", "id"])
    op.create_index("ix_jobs_caller", "jobs", ["caller", "created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_caller", table_name="jobs")
    op.drop_index("ix_circuits_owner", table_name="circuits")
    with op.batch_alter_table("circuits") as batch:
        batch.drop_column("owner")
    op.drop_index("ix_datasets_owner", table_name="datasets")
    with op.batch_alter_table("datasets") as batch:
        batch.drop_constraint(op.f("uq_datasets_owner_request_id"), type_="unique")
        batch.drop_column("request_id")
        batch.drop_column("owner")
