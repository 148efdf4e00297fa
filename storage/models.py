"""The schema, in SQLAlchemy 2.0's typed ORM style.

Migrations in `migrations/versions/` must match these models exactly (a test compares
them); change both together. Repositories use these classes inside their transactions and
hand out `records.py` values, never the ORM objects.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    true,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from edgeprune.storage.records import JobState

UTC = timezone.utc

# Stable constraint names, so SQLite batch migrations can find and alter them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JsonValue = JSON().with_variant(postgresql.JSONB(), "postgresql")
"""JSON on SQLite, JSONB on PostgreSQL."""


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps on both backends (SQLite stores naive UTC text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: storage timestamps must be timezone-aware")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012 (SQLAlchemy reads it once)
        datetime: UtcDateTime(),
        dict[str, Any]: JsonValue,
        bytes: LargeBinary(),
    }


class Blob(Base):
    """Content-addressed bytes; `data` is deferred so ordinary queries never load it."""

    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    media_type: Mapped[str] = mapped_column(String(128))
    data: Mapped[bytes] = mapped_column(deferred=True)
    created_at: Mapped[datetime]


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(255), server_default="")
    request_id: Mapped[str | None] = mapped_column(String(255))
    display_name: Mapped[str] = mapped_column(String(255))
    source: Mapped[str] = mapped_column(String(255))  # how the examples came in: "upload"
    labels: Mapped[dict[str, Any]]
    example_count: Mapped[int]
    content_hash: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger, server_default="0")
    # False while an upload's examples are being stored (several short transactions).
    ready: Mapped[bool] = mapped_column(Boolean, server_default=true())
    created_at: Mapped[datetime]

    __table_args__ = (
        UniqueConstraint("owner", "request_id"),
        Index("ix_datasets_created", "created_at", "id"),
        Index("ix_datasets_owner", "owner", "created_at", "id"),
    )


class DatasetExample(Base):
    """One example, keyed by its position, so batches are index range reads."""

    __tablename__ = "dataset_examples"

    dataset_id: Mapped[str] = mapped_column(
        ForeignKey("datasets.id", ondelete="CASCADE"), primary_key=True
    )
    idx: Mapped[int] = mapped_column(primary_key=True)
    data: Mapped[dict[str, Any]]

    __table_args__ = ({"sqlite_with_rowid": False},)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(64))
    spec: Mapped[bytes]
    spec_json: Mapped[dict[str, Any]]
    state: Mapped[JobState] = mapped_column(
        Enum(JobState, native_enum=False, length=16, create_constraint=True, name="job_state")
    )
    priority: Mapped[int]
    labels: Mapped[dict[str, Any]]
    owner: Mapped[str] = mapped_column(String(255))
    request_id: Mapped[str | None] = mapped_column(String(255))
    attempt: Mapped[int]
    cancel_requested: Mapped[bool] = mapped_column(Boolean)
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    progress: Mapped[dict[str, Any]]
    checkpoint_blob: Mapped[str | None] = mapped_column(ForeignKey("blobs.sha256"))
    result: Mapped[dict[str, Any]]
    error: Mapped[str | None] = mapped_column(Text)
    error_reason: Mapped[str | None] = mapped_column(String(64))
    last_event_sequence: Mapped[int]

    __table_args__ = (
        UniqueConstraint("owner", "request_id"),
        # reclaim: RUNNING jobs whose lease expired
        Index("ix_jobs_lease", "state", "lease_expires_at"),
        Index("ix_jobs_created", "created_at", "id"),
        Index("ix_jobs_owner", "owner", "created_at", "id"),
    )


# claim: the next PENDING job by priority (highest first), then age: read in index order
Index("ix_jobs_claim", Job.state, Job.priority.desc(), Job.created_at, Job.id)


class JobEvent(Base):
    """Progress stream entries; (job_id, sequence) is dense per job."""

    __tablename__ = "job_events"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    sequence: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]]
    attempt: Mapped[int]
    created_at: Mapped[datetime]

    __table_args__ = ({"sqlite_with_rowid": False},)


class EdgeName(Base):
    """Edge names interned per model: circuit_edges stores small integer ids."""

    __tablename__ = "edge_names"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model: Mapped[str] = mapped_column(String(255))
    name: Mapped[str] = mapped_column(String(255))

    # (name, model): serves lookups by name alone (any model) and by (model, name)
    __table_args__ = (UniqueConstraint("name", "model"), {"sqlite_autoincrement": True})


class NodeName(Base):
    """Node (writer) names interned per model."""

    __tablename__ = "node_names"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model: Mapped[str] = mapped_column(String(255))
    name: Mapped[str] = mapped_column(String(255))

    # (name, model): serves lookups by name alone (any model) and by (model, name)
    __table_args__ = (UniqueConstraint("name", "model"), {"sqlite_autoincrement": True})


class Circuit(Base):
    __tablename__ = "circuits"

    # AUTOINCREMENT on SQLite: ids of deleted circuits are never handed out again.
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str] = mapped_column(String(255), server_default="")
    model: Mapped[str] = mapped_column(String(255))
    method: Mapped[str] = mapped_column(String(32))
    task: Mapped[str] = mapped_column(String(64))
    dataset_id: Mapped[str | None] = mapped_column(
        ForeignKey("datasets.id", ondelete="SET NULL")
    )
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    edge_count: Mapped[int]
    total_edge_count: Mapped[int]
    node_count: Mapped[int]
    total_node_count: Mapped[int]
    edge_sparsity: Mapped[float] = mapped_column(Float)
    target: Mapped[dict[str, Any]]
    settings: Mapped[dict[str, Any]]
    provenance: Mapped[dict[str, Any]]
    metrics: Mapped[dict[str, Any]]
    mask_blob: Mapped[str | None] = mapped_column(ForeignKey("blobs.sha256"))
    created_at: Mapped[datetime]
    request_id: Mapped[str | None] = mapped_column(String(255))  # imports: unique per owner

    __table_args__ = (
        UniqueConstraint("owner", "request_id"),
        Index("ix_circuits_model", "model", "id"),
        Index("ix_circuits_owner", "owner", "id"),
        Index("ix_circuits_job", "job_id"),
        Index("ix_circuits_dataset", "dataset_id"),
        {"sqlite_autoincrement": True},
    )


class CircuitEdge(Base):
    """(circuit, edge) pairs. The PK serves "edges of circuit C"; ix_circuit_edges_edge
    serves "circuits containing edge E", newest first."""

    __tablename__ = "circuit_edges"

    circuit_id: Mapped[int] = mapped_column(
        ForeignKey("circuits.id", ondelete="CASCADE"), primary_key=True
    )
    edge_id: Mapped[int] = mapped_column(ForeignKey("edge_names.id"), primary_key=True)
    score: Mapped[float | None] = mapped_column(Float)

    __table_args__ = (
        Index("ix_circuit_edges_edge", "edge_id", "circuit_id"),
        {"sqlite_with_rowid": False},  # the table is its primary-key index
    )


class CircuitNode(Base):
    __tablename__ = "circuit_nodes"

    circuit_id: Mapped[int] = mapped_column(
        ForeignKey("circuits.id", ondelete="CASCADE"), primary_key=True
    )
    node_id: Mapped[int] = mapped_column(ForeignKey("node_names.id"), primary_key=True)

    __table_args__ = (
        Index("ix_circuit_nodes_node", "node_id", "circuit_id"),
        {"sqlite_with_rowid": False},
    )
