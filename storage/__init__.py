"""edgeprune.storage: SQL storage for datasets, jobs, events, circuits and blobs, and the
job queue with leases.

    db = Database(default_database_url(data_dir))      # or "postgresql+psycopg://..."
    db.migrate()                                       # on every start; idempotent
    jobs, queue = JobRepo(db), Queue(db)
    job = jobs.create(NewJob(spec=spec_bytes, spec_json=spec_dict, request_id="r1"))
    claim = queue.claim("worker-1", lease_s=30)        # in a worker process
    cancel = queue.heartbeat(claim)                    # every few seconds; LeaseLost -> stop
    queue.complete(claim, [NewCircuit(...)], result={...})

Repositories take a `Database` and run each method in its own transaction. They return
immutable records (`records.py`), never live ORM objects. Errors are in `errors.py`:
NotFound, AlreadyExists, Conflict, LeaseLost, InvalidArgument, IntegrityError, Unavailable.
"""

from edgeprune.storage.blobs import BlobStore
from edgeprune.storage.circuits import CircuitRepo
from edgeprune.storage.datasets import DatasetRepo
from edgeprune.storage.db import Database, default_database_url
from edgeprune.storage.errors import (
    AlreadyExists,
    Conflict,
    FencingError,
    IntegrityError,
    InvalidArgument,
    LeaseLost,
    NotFound,
    QueueFull,
    StorageError,
    Unavailable,
)
from edgeprune.storage.events import EventRepo
from edgeprune.storage.jobs import JobRepo
from edgeprune.storage.queue import Queue
from edgeprune.storage.records import (
    CircuitFilter,
    CircuitRecord,
    Claim,
    DatasetRecord,
    EventRecord,
    JobRecord,
    JobState,
    NewCircuit,
    NewDataset,
    NewJob,
    Page,
)

__all__ = [
    "AlreadyExists",
    "BlobStore",
    "CircuitFilter",
    "CircuitRecord",
    "CircuitRepo",
    "Claim",
    "Conflict",
    "Database",
    "DatasetRecord",
    "DatasetRepo",
    "EventRecord",
    "EventRepo",
    "FencingError",
    "IntegrityError",
    "InvalidArgument",
    "JobRecord",
    "JobRepo",
    "JobState",
    "LeaseLost",
    "NewCircuit",
    "NewDataset",
    "NewJob",
    "NotFound",
    "Page",
    "Queue",
    "QueueFull",
    "StorageError",
    "Unavailable",
    "default_database_url",
]
