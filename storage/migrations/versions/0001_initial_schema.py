"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-25

Tables: blobs, datasets (+ dataset_examples), jobs (+ job_events), edge_names, node_names,
circuits (+ circuit_edges, circuit_nodes). Self-contained: it must not import the models,
which move on with later revisions.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "blobs",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("media_type", sa.String(length=128), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_blobs")),
    )
    op.create_table(
        "datasets",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("display_name", sa.String(length=255), nullable=False),
        sa.Column("source", sa.String(length=255), nullable=False),
        sa.Column("task", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=255), nullable=False),
        sa.Column("tokenizer", sa.String(length=255), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("labels", JSON, nullable=False),
        sa.Column("example_count", sa.Integer(), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_datasets")),
    )
    op.create_index("ix_datasets_created", "datasets", ["created_at", "id"], unique=False)

    op.create_table(
        "edge_names",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(length=255), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_edge_names")),
        sa.UniqueConstraint("name", "model", name=op.f("uq_edge_names_name_model")),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "node_names",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(length=255), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_node_names")),
        sa.UniqueConstraint("name", "model", name=op.f("uq_node_names_name_model")),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "dataset_examples",
        sa.Column("dataset_id", sa.String(length=64), nullable=False),
        sa.Column("idx", sa.Integer(), nullable=False),
        sa.Column("data", JSON, nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_id"],
            ["datasets.id"],
            name=op.f("fk_dataset_examples_dataset_id_datasets"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("dataset_id", "idx", name=op.f("pk_dataset_examples")),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("display_name", sa.String(length=255), nullable=False),
        sa.Column("spec", sa.LargeBinary(), nullable=False),
        sa.Column("spec_json", JSON, nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "PENDING",
                "RUNNING",
                "SUCCEEDED",
                "FAILED",
                "CANCELLED",
                name="job_state",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("labels", JSON, nullable=False),
        sa.Column("caller", sa.String(length=255), nullable=False),
        sa.Column("request_id", sa.String(length=255), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("lease_owner", sa.String(length=255), nullable=True),
        sa.Column("lease_expires_at", TIMESTAMP, nullable=True),
        sa.Column("heartbeat_at", TIMESTAMP, nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.Column("started_at", TIMESTAMP, nullable=True),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.Column("progress", JSON, nullable=False),
        sa.Column("checkpoint_blob", sa.String(length=64), nullable=True),
        sa.Column("result", JSON, nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("error_reason", sa.String(length=64), nullable=True),
        sa.Column("last_event_seq", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["checkpoint_blob"], ["blobs.sha256"], name=op.f("fk_jobs_checkpoint_blob_blobs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
        sa.UniqueConstraint("caller", "request_id", name=op.f("uq_jobs_caller_request_id")),
    )
    op.create_index(
        "ix_jobs_claim",
        "jobs",
        ["state", sa.text("priority DESC"), "created_at", "id"],
        unique=False,
    )
    op.create_index("ix_jobs_created", "jobs", ["created_at", "id"], unique=False)
    op.create_index("ix_jobs_lease", "jobs", ["state", "lease_expires_at"], unique=False)

    op.create_table(
        "circuits",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(length=255), nullable=False),
        sa.Column("method", sa.String(length=32), nullable=False),
        sa.Column("task", sa.String(length=64), nullable=False),
        sa.Column("dataset_id", sa.String(length=64), nullable=True),
        sa.Column("job_id", sa.String(length=32), nullable=True),
        sa.Column("display_name", sa.String(length=255), nullable=False),
        sa.Column("n_edges", sa.Integer(), nullable=False),
        sa.Column("n_edges_total", sa.Integer(), nullable=False),
        sa.Column("n_nodes", sa.Integer(), nullable=False),
        sa.Column("n_nodes_total", sa.Integer(), nullable=False),
        sa.Column("sparsity", sa.Float(), nullable=False),
        sa.Column("target", JSON, nullable=False),
        sa.Column("settings", JSON, nullable=False),
        sa.Column("provenance", JSON, nullable=False),
        sa.Column("metrics", JSON, nullable=False),
        sa.Column("mask_blob", sa.String(length=64), nullable=True),
        sa.Column("log_alpha_blob", sa.String(length=64), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_id"],
            ["datasets.id"],
            name=op.f("fk_circuits_dataset_id_datasets"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_circuits_job_id_jobs"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["log_alpha_blob"], ["blobs.sha256"], name=op.f("fk_circuits_log_alpha_blob_blobs")
        ),
        sa.ForeignKeyConstraint(
            ["mask_blob"], ["blobs.sha256"], name=op.f("fk_circuits_mask_blob_blobs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_circuits")),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_circuits_dataset", "circuits", ["dataset_id"], unique=False)
    op.create_index("ix_circuits_job", "circuits", ["job_id"], unique=False)
    op.create_index("ix_circuits_model", "circuits", ["model", "id"], unique=False)

    op.create_table(
        "job_events",
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("payload", JSON, nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_job_events_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "seq", name=op.f("pk_job_events")),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "circuit_edges",
        sa.Column("circuit_id", sa.Integer(), nullable=False),
        sa.Column("edge_id", sa.Integer(), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["circuit_id"],
            ["circuits.id"],
            name=op.f("fk_circuit_edges_circuit_id_circuits"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["edge_id"], ["edge_names.id"], name=op.f("fk_circuit_edges_edge_id_edge_names")
        ),
        sa.PrimaryKeyConstraint("circuit_id", "edge_id", name=op.f("pk_circuit_edges")),
        sqlite_with_rowid=False,
    )
    op.create_index(
        "ix_circuit_edges_edge", "circuit_edges", ["edge_id", "circuit_id"], unique=False
    )

    op.create_table(
        "circuit_nodes",
        sa.Column("circuit_id", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["circuit_id"],
            ["circuits.id"],
            name=op.f("fk_circuit_nodes_circuit_id_circuits"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["node_id"], ["node_names.id"], name=op.f("fk_circuit_nodes_node_id_node_names")
        ),
        sa.PrimaryKeyConstraint("circuit_id", "node_id", name=op.f("pk_circuit_nodes")),
        sqlite_with_rowid=False,
    )
    op.create_index(
        "ix_circuit_nodes_node", "circuit_nodes", ["node_id", "circuit_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_circuit_nodes_node", table_name="circuit_nodes")

    op.drop_table("circuit_nodes")
    op.drop_index("ix_circuit_edges_edge", table_name="circuit_edges")

    op.drop_table("circuit_edges")
    op.drop_table("job_events")
    op.drop_index("ix_circuits_model", table_name="circuits")
    op.drop_index("ix_circuits_job", table_name="circuits")
    op.drop_index("ix_circuits_dataset", table_name="circuits")

    op.drop_table("circuits")
    op.drop_index("ix_jobs_lease", table_name="jobs")
    op.drop_index("ix_jobs_created", table_name="jobs")
    op.drop_index("ix_jobs_claim", table_name="jobs")

    op.drop_table("jobs")
    op.drop_table("dataset_examples")
    op.drop_table("node_names")
    op.drop_table("edge_names")
    op.drop_index("ix_datasets_created", table_name="datasets")

    op.drop_table("datasets")
    op.drop_table("blobs")
