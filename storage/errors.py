"""The storage layer's exceptions: one tree under `StorageError`.

    StorageError
    ├── NotFound            a dataset, job, circuit, blob or event stream does not exist
    ├── AlreadyExists       an id is taken, or a request_id was reused for a different request
    ├── Conflict            the resource is not in a state that allows the change
    │   ├── LeaseLost       a worker's claim was fenced out (lease expired and reclaimed,
    │   │                   job cancelled or finished): its write was rejected
    │   └── QueueFull       a new job was refused: the pending-job cap is reached
    ├── InvalidArgument     bad page token, page size or filter (also a ValueError)
    ├── IntegrityError      stored bytes do not match their SHA-256: never used silently
    └── Unavailable         the database cannot be reached, stayed locked, or cannot write
                            (disk full, I/O error): the one retryable error

Every error carries a human-readable message; the service maps them onto gRPC codes
(NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION / ABORTED, INVALID_ARGUMENT, DATA_LOSS,
UNAVAILABLE) without looking inside. `retryable` says whether the same call may succeed
later unchanged: callers back off and retry those, and give up on the others.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base class of every error raised by `edgeprune.storage`."""

    retryable = False


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


class QueueFull(Conflict):
    """A new job was refused: `limit` jobs are PENDING already (`owner`: that owner's)."""

    def __init__(self, limit: int, owner: str | None = None) -> None:
        whose = f"{owner}'s pending jobs are" if owner is not None else "pending jobs are"
        super().__init__(f"{limit} of {whose} queued already; retry later")
        self.limit = limit
        self.owner = owner


class InvalidArgument(StorageError, ValueError):
    """A request parameter is malformed; `field` names it."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class IntegrityError(StorageError):
    """Stored bytes fail their SHA-256 check (corruption or tampering)."""


class Unavailable(StorageError):
    """The database could not be reached, stayed locked past the busy timeout, or could not
    write (disk full, I/O error). The message names the condition, never the connection
    (host, port, user); `detail` keeps the driver's text for the log. `retry_after_s` is a
    hint for callers."""

    retryable = True

    def __init__(self, message: str, *, detail: str = "", retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.detail = detail
        self.retry_after_s = retry_after_s
