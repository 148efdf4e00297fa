"""The storage layer's exceptions: one tree under `StorageError`.

    StorageError
    ├── NotFound            a dataset, job, circuit, blob or event stream does not exist
    ├── AlreadyExists       an id is taken, or a request_id was reused for a different request
    ├── Conflict            the resource is not in a state that allows the change
    │   └── LeaseLost       a worker's claim was fenced out (lease expired and reclaimed,
    │                       job cancelled or finished): its write was rejected
    ├── InvalidArgument     bad page token, page size or filter (also a ValueError)
    ├── IntegrityError      stored bytes do not match their SHA-256: never used silently
    └── Unavailable         the database cannot be reached or stayed locked

Every error carries a human-readable message; the service maps them onto gRPC codes
(NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION / ABORTED, INVALID_ARGUMENT, DATA_LOSS,
UNAVAILABLE) without looking inside.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base class of every error raised by `edgeprune.storage`."""


class NotFound(StorageError, LookupError):
    """A resource does not exist. `kind` is e.g. "job", `key` its id."""

    def __init__(self, kind: str, key: str) -> None:
        super().__init__(f"{kind} {key!r} not found")
        self.kind = kind
        self.key = key


class AlreadyExists(StorageError):
    """An id is already taken, or a request_id was reused with a different request."""

    def __init__(self, kind: str, key: str, message: str | None = None) -> None:
        super().__init__(message or f"{kind} {key!r} already exists")
        self.kind = kind
        self.key = key


class Conflict(StorageError):
    """The resource's current state does not allow the requested change."""


class LeaseLost(Conflict):
    """A worker's write was fenced out: the job is no longer held by this claim.

    Raised when another attempt took the job over after the lease expired, or the job
    reached a final state (cancelled, failed, succeeded). The worker must stop the job
    and drop its results: they belong to nobody.
    """

    def __init__(self, job_id: str, attempt: int, reason: str) -> None:
        super().__init__(f"job {job_id!r} attempt {attempt}: lease lost ({reason})")
        self.job_id = job_id
        self.attempt = attempt
        self.reason = reason


FencingError = LeaseLost
"""Alias: a fenced-out write is a lost lease."""


class InvalidArgument(StorageError, ValueError):
    """A request parameter is malformed; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class IntegrityError(StorageError):
    """Stored bytes fail their SHA-256 check (corruption or tampering)."""


class Unavailable(StorageError):
    """The database could not be reached, or stayed locked past the busy timeout."""
