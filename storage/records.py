"""Plain, immutable values that go into and come out of the repositories.

Nothing here is bound to a database session: records are safe to keep, pickle and pass
between threads and processes. Timestamps are timezone-aware UTC `datetime`s; JSON
fields are plain dicts (str keys).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

T = TypeVar("T")
JsonDict = dict[str, Any]


class JobState(str, enum.Enum):
    """A job's life cycle: PENDING -> RUNNING -> SUCCEEDED | FAILED | CANCELLED.

    A RUNNING job whose lease expires goes back to PENDING (or FAILED once it has used
    its attempts); a drained worker releases its job back to PENDING.
    """

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def final(self) -> bool:
        """True for SUCCEEDED, FAILED and CANCELLED: nothing changes the job any more."""
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list call. `next_page_token` is None on the last page."""

    items: list[T]
    next_page_token: str | None = None


# ---------------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class NewDataset:
    """What `DatasetRepo.create` needs. `id` None -> a generated id.

    `owner` is the principal the dataset belongs to; a `request_id` is unique per owner: the
    same (owner, request_id) with the same content returns the first dataset.
    """

    owner: str = ""
    request_id: str | None = None
    size_bytes: int = 0  # of the uploaded content
    display_name: str = ""
    source: str = ""  # how the examples came in ("upload")
    labels: Mapping[str, str] = field(default_factory=dict)
    id: str | None = None


@dataclass(frozen=True)
class DatasetRecord:
    """A stored dataset's metadata (its examples are read with `DatasetRepo.examples`).

    `content_hash` is the SHA-256 of the examples' canonical JSON lines, in order.
    """

    id: str
    owner: str
    request_id: str | None
    size_bytes: int
    ready: bool  # False while its upload is being stored
    display_name: str
    source: str
    labels: JsonDict
    example_count: int
    content_hash: str
    created_at: datetime


# -------------------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class NewJob:
    """What `JobRepo.create` needs.

    `spec` is the serialized protobuf JobSpec (the authoritative copy) and `spec_json` the
    same spec as JSON, for humans and ad-hoc SQL. `request_id` makes creation idempotent
    per `owner`: the same (owner, request_id) with the same spec returns the first job.
    Higher `priority` runs first; equal priorities run oldest first.
    """

    spec: bytes
    spec_json: Mapping[str, Any]
    kind: str = ""
    priority: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    owner: str = ""  # the principal that submitted the job
    request_id: str | None = None


@dataclass(frozen=True)
class JobRecord:
    """A job as stored.

    attempt: how many times the job was claimed; the fencing token of the current claim.
    lease_owner / lease_expires_at / heartbeat_at: set while RUNNING.
    progress: the latest "progress" event's payload (a summary for GetJob).
    checkpoint_blob: SHA-256 of the latest checkpoint (read with `BlobStore.get`), or None.
    result: small JSON summary set on success; "circuits" lists the ids of the circuits
        stored with it (read them with `CircuitRepo`).
    last_event_sequence: sequence number of the job's latest event (replay with `EventRepo`).
    error / error_reason: why the job FAILED (or was CANCELLED), else None.
    """

    id: str
    kind: str
    spec: bytes
    spec_json: JsonDict
    state: JobState
    priority: int
    labels: JsonDict
    owner: str
    request_id: str | None
    attempt: int
    cancel_requested: bool
    lease_owner: str | None
    lease_expires_at: datetime | None
    heartbeat_at: datetime | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: JsonDict
    checkpoint_blob: str | None
    result: JsonDict
    error: str | None
    error_reason: str | None
    last_event_sequence: int


@dataclass(frozen=True)
class Claim:
    """A worker's hold on a RUNNING job: pass it to every `Queue` call for that job.

    `attempt` fences every write: once the job was reclaimed (attempt moved on) or reached
    a final state, writes with this claim raise `LeaseLost`. Picklable.
    """

    job: JobRecord
    attempt: int
    worker_id: str
    lease_s: float
    lease_expires_at: datetime

    @property
    def job_id(self) -> str:
        return self.job.id


@dataclass(frozen=True)
class EventRecord:
    """One durable progress event; `sequence` is dense per job, starting at 1."""

    job_id: str
    sequence: int
    kind: str
    payload: JsonDict
    attempt: int
    created_at: datetime


# ---------------------------------------------------------------------------------- circuits


@dataclass(frozen=True)
class NewCircuit:
    """A circuit to store.

    edges: edge names "{writer}->{reader}" kept in the circuit; edge_scores optionally maps
    (some of) them to a score. nodes: writer nodes kept. total_edge_count: edges in the full
    graph (edge_sparsity = 1 - len(edges) / total_edge_count). mask_blob: SHA-256 of a safetensors
    blob stored with `BlobStore.put` (or None). `request_id` makes a create idempotent per
    `owner`: the same (owner, request_id) with the same model and provenance returns the first
    circuit.
    """

    model: str
    method: str
    edges: Sequence[str]
    total_edge_count: int
    nodes: Sequence[str] = ()
    total_node_count: int = 0
    edge_scores: Mapping[str, float] = field(default_factory=dict)
    task: str = ""
    dataset_id: str | None = None
    job_id: str | None = None
    target: Mapping[str, Any] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    mask_blob: str | None = None
    owner: str = ""
    request_id: str | None = None


@dataclass(frozen=True)
class CircuitRecord:
    """A stored circuit. `edges`, `edge_scores` and `nodes` are None unless asked for
    (`full=True`): lists stay cheap."""

    id: str
    owner: str
    model: str
    method: str
    task: str
    dataset_id: str | None
    job_id: str | None
    edge_count: int
    total_edge_count: int
    node_count: int
    total_node_count: int
    edge_sparsity: float
    target: JsonDict
    settings: JsonDict
    provenance: JsonDict
    metrics: JsonDict
    mask_blob: str | None
    created_at: datetime
    edges: list[str] | None = None
    edge_scores: dict[str, float] | None = None
    nodes: list[str] | None = None


@dataclass(frozen=True)
class CircuitFilter:
    """Filters for `CircuitRepo.list`; every field given must match (AND).

    contains_edges / contains_nodes: the circuit keeps all of these edges / nodes.
    min_edge_count / max_edge_count bound the number of kept edges, min_edge_sparsity / max_edge_sparsity the
    edge sparsity (inclusive).
    """

    owner: str | None = None
    model: str | None = None
    task: str | None = None
    dataset_id: str | None = None
    method: str | None = None
    job_id: str | None = None
    min_edge_count: int | None = None
    max_edge_count: int | None = None
    min_edge_sparsity: float | None = None
    max_edge_sparsity: float | None = None
    contains_edges: Sequence[str] = ()
    contains_nodes: Sequence[str] = ()
