"""vocabulary

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05

The columns take the API's names, so one word means one thing from the proto to the table:
circuits.n_edges / n_edges_total / n_nodes / n_nodes_total become edge_count /
total_edge_count / node_count / total_node_count, jobs.caller becomes owner (as datasets and
circuits say), job_events.seq and jobs.last_event_seq become sequence and last_event_sequence.
The unique constraint and index named after `caller` are recreated under `owner`.

Columns nothing ever wrote (or only wrote empty) are dropped: datasets.task, model, tokenizer
and description, jobs.display_name, circuits.display_name and circuits.log_alpha_blob. The
downgrade adds them back empty.

SQLite cannot rename a constraint or drop a column with a foreign key in place, so jobs and
circuits are copied into new tables (batch mode); `Database.migrate` turns SQLite's foreign key
enforcement off meanwhile, or dropping the old tables would cascade into their events, edges
and nodes.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_CIRCUIT_COUNTS = (("n_edges", "edge_count"), ("n_edges_total", "total_edge_count"),
                   ("n_nodes", "node_count"), ("n_nodes_total", "total_node_count"))
_DATASET_TEXTS = (("task", sa.String(length=64)), ("model", sa.String(length=255)),
                  ("tokenizer", sa.String(length=255)), ("description", sa.Text()))


def _claim_index() -> None:
    """ix_jobs_claim, as 0001 made it: SQLite's copy of a table loses the index's DESC."""
    op.create_index("ix_jobs_claim", "jobs",
                    ["state", sa.text("priority DESC"), "created_at", "id"])


def upgrade() -> None:
    op.alter_column("job_events", "seq", new_column_name="sequence")
    op.drop_index("ix_jobs_caller", table_name="jobs")
    op.drop_index("ix_jobs_claim", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(op.f("uq_jobs_caller_request_id"), type_="unique")
        batch.alter_column("caller", new_column_name="owner", existing_type=sa.String(255),
                           existing_nullable=False)
        batch.alter_column("last_event_seq", new_column_name="last_event_sequence",
                           existing_type=sa.Integer(), existing_nullable=False)
        batch.drop_column("display_name")
    with op.batch_alter_table("jobs") as batch:
        batch.create_unique_constraint(op.f("uq_jobs_owner_request_id"), ["owner", "request_id"])
    op.create_index("ix_jobs_owner", "jobs", ["owner", "created_at", "id"])
    _claim_index()
    with op.batch_alter_table("circuits", table_kwargs={"sqlite_autoincrement": True}) as batch:
        for old, new in _CIRCUIT_COUNTS:
            batch.alter_column(old, new_column_name=new, existing_type=sa.Integer(),
                               existing_nullable=False)
        batch.drop_constraint(op.f("fk_circuits_log_alpha_blob_blobs"), type_="foreignkey")
        batch.drop_column("log_alpha_blob")
        batch.drop_column("display_name")
    with op.batch_alter_table("datasets") as batch:
        for name, _ in _DATASET_TEXTS:
            batch.drop_column(name)


def downgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        for name, type_ in _DATASET_TEXTS:
            batch.add_column(sa.Column(name, type_, server_default="", nullable=False))
    with op.batch_alter_table("circuits", table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.add_column(sa.Column("display_name", sa.String(length=255), server_default="",
                                   nullable=False))
        batch.add_column(sa.Column("log_alpha_blob", sa.String(length=64), nullable=True))
        batch.create_foreign_key(op.f("fk_circuits_log_alpha_blob_blobs"), "blobs",
                                 ["log_alpha_blob"], ["sha256"])
        for old, new in _CIRCUIT_COUNTS:
            batch.alter_column(new, new_column_name=old, existing_type=sa.Integer(),
                               existing_nullable=False)
    op.drop_index("ix_jobs_owner", table_name="jobs")
    op.drop_index("ix_jobs_claim", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(op.f("uq_jobs_owner_request_id"), type_="unique")
        batch.add_column(sa.Column("display_name", sa.String(length=255), server_default="",
                                   nullable=False))
        batch.alter_column("last_event_sequence", new_column_name="last_event_seq",
                           existing_type=sa.Integer(), existing_nullable=False)
        batch.alter_column("owner", new_column_name="caller", existing_type=sa.String(255),
                           existing_nullable=False)
    with op.batch_alter_table("jobs") as batch:
        batch.create_unique_constraint(op.f("uq_jobs_caller_request_id"),
                                       ["caller", "request_id"])
    op.create_index("ix_jobs_caller", "jobs", ["caller", "created_at", "id"])
    _claim_index()
    op.alter_column("job_events", "sequence", new_column_name="seq")
