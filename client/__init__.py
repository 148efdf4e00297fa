"""edgeprune.client: the thin client and ``edgeprune`` command line of the edgeprune service.

Needs only grpcio, protobuf, googleapis-common-protos and PyYAML (never torch,
transformers or SQLAlchemy)::

    from edgeprune.client import Client

    with Client("localhost:50051") as client:
        job = client.submit(model="smollm2-135m", task="ioi", sparsity=0.98, steps=200)
        job = client.wait(job.name)                       # raises JobFailed / JobCancelled
        client.export_circuit(job.result.circuits[0], "circuit.svg", format="svg")

:class:`AsyncClient` has the same methods for asyncio. Errors form one tree under
:class:`EdgepruneError` (see :mod:`edgeprune.client.errors`).
"""

from ._async import AsyncClient
from ._core import DEFAULT_TARGET, DEFAULT_TIMEOUT
from ._retry import RetryPolicy
from ._spec import job_spec, load_examples, load_job_file
from ._sync import Client
from .errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    EdgepruneError,
    FailedPrecondition,
    FieldViolation,
    InsecureTransport,
    InvalidArgument,
    JobCancelled,
    JobError,
    JobFailed,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServerError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from .progress import ProgressBar

__all__ = [
    "DEFAULT_TARGET",
    "DEFAULT_TIMEOUT",
    "AlreadyExists",
    "AsyncClient",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "EdgepruneError",
    "FailedPrecondition",
    "FieldViolation",
    "InsecureTransport",
    "InvalidArgument",
    "JobCancelled",
    "JobError",
    "JobFailed",
    "NotFound",
    "PermissionDenied",
    "ProgressBar",
    "ResourceExhausted",
    "RetryPolicy",
    "ServerError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "job_spec",
    "load_examples",
    "load_job_file",
]
