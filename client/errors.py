"""The client's exception tree: one base class, one subclass per failure kind.

Every error the client raises is an :class:`EdgepruneError`::

    EdgepruneError                     base; .code .message .reason .domain .metadata .field
    ├── InvalidArgument                INVALID_ARGUMENT / OUT_OF_RANGE (bad input; .field names it)
    ├── NotFound                       NOT_FOUND
    ├── AlreadyExists                  ALREADY_EXISTS
    ├── FailedPrecondition             FAILED_PRECONDITION / ABORTED (wrong state, e.g. cancel a finished job)
    ├── ResourceExhausted              RESOURCE_EXHAUSTED (a server limit, e.g. model too big for memory)
    ├── Unauthenticated                UNAUTHENTICATED (no valid token)
    │   └── PermissionDenied           PERMISSION_DENIED (the token's principal may not, e.g. that priority)
    ├── Unavailable                    UNAVAILABLE (after the client's retries ran out)
    ├── DeadlineExceeded               DEADLINE_EXCEEDED
    ├── Cancelled                      CANCELLED
    ├── Unimplemented                  UNIMPLEMENTED
    ├── ServerError                    INTERNAL / UNKNOWN / DATA_LOSS
    ├── InsecureTransport              client-side: a token would go out without TLS
    └── JobError                       a job ended without success (raised by ``wait``)
        ├── JobFailed                  state FAILED; .job is the final Job
        └── JobCancelled               state CANCELLED

Errors from the server carry the google.rpc.Status details it sent (AIP-193): the
ErrorInfo ``reason`` (a stable UPPER_SNAKE_CASE string to branch on), its ``domain``
and ``metadata``, and the BadRequest field violations (``field`` is the first one).
The details travel in the ``grpc-status-details-bin`` trailer, parsed here with
google.rpc.status_pb2 so the base install needs no grpcio-status.

Each class has an ``exit_code`` that the ``edgeprune`` command line exits with.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from edgeprune.v1 import job_pb2

__all__ = [
    "AlreadyExists",
    "Cancelled",
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
    "ResourceExhausted",
    "ServerError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "from_rpc_error",
    "job_error",
]

_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request, from a google.rpc.BadRequest detail."""

    field: str
    description: str
    reason: str = ""


class EdgepruneError(Exception):
    """Base class of every error raised by :mod:`edgeprune.client`."""

    #: The gRPC status code this class stands for (None for client-side errors).
    grpc_code: grpc.StatusCode | None = None
    #: What the ``edgeprune`` command exits with when this error ends it.
    exit_code: int = 1

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        violations: Iterable[FieldViolation] = (),
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code if code is not None else self.grpc_code
        self.reason = reason
        self.domain = domain
        self.metadata: dict[str, str] = dict(metadata or {})
        self.violations: tuple[FieldViolation, ...] = tuple(violations)
        if field is None and self.violations:
            field = self.violations[0].field
        self.field = field

    def __str__(self) -> str:
        text = self.message
        if self.field and self.field not in text:
            text = f"{self.field}: {text}"
        return f"{text} [{self.reason}]" if self.reason else text

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view, used by ``edgeprune --json`` error output."""
        return {
            "error": type(self).__name__,
            "code": self.code.name if self.code is not None else None,
            "message": self.message,
            "reason": self.reason or None,
            "field": self.field,
            "metadata": self.metadata or None,
            "violations": [v.__dict__ for v in self.violations] or None,
        }


class InvalidArgument(EdgepruneError):
    """The request (or a job file / keyword argument) is malformed; ``field`` names the culprit."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    exit_code = 3


class NotFound(EdgepruneError):
    """The named job, dataset or circuit does not exist."""

    grpc_code = grpc.StatusCode.NOT_FOUND
    exit_code = 4


class AlreadyExists(EdgepruneError):
    """A resource with that name (or request_id with another body) exists."""

    grpc_code = grpc.StatusCode.ALREADY_EXISTS
    exit_code = 5


class FailedPrecondition(EdgepruneError):
    """The resource is in the wrong state for the call."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    exit_code = 6


class ResourceExhausted(EdgepruneError):
    """A server limit was hit (size, steps, memory estimate, quota)."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    exit_code = 7


class Unauthenticated(EdgepruneError):
    """No valid bearer token, or the token may not do this."""

    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    exit_code = 8


class PermissionDenied(Unauthenticated):
    """The token is valid but its principal may not do this (e.g. submit at that priority)."""

    grpc_code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(EdgepruneError):
    """The server could not be reached (after retrying)."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    exit_code = 9


class DeadlineExceeded(EdgepruneError):
    """The call did not finish within its deadline."""

    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    exit_code = 9


class Cancelled(EdgepruneError):
    """The call was cancelled."""

    grpc_code = grpc.StatusCode.CANCELLED
    exit_code = 130


class Unimplemented(EdgepruneError):
    """The server does not implement this call (older server version)."""

    grpc_code = grpc.StatusCode.UNIMPLEMENTED
    exit_code = 1


class ServerError(EdgepruneError):
    """The server failed (INTERNAL, UNKNOWN, DATA_LOSS)."""

    grpc_code = grpc.StatusCode.INTERNAL
    exit_code = 1


class InsecureTransport(EdgepruneError):
    """A bearer token would be sent in plaintext to a host other than this one; raised before
    anything is sent. Use TLS, or say ``insecure=True`` for a network you trust."""

    exit_code = 2


class JobError(EdgepruneError):
    """A job ended in a state other than SUCCEEDED; ``job`` is its final Job message."""

    exit_code = 10

    def __init__(self, message: str, *, job: Any = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.job = job


class JobFailed(JobError):
    """The job ended FAILED; its error is in the message and ``reason``."""

    exit_code = 10


class JobCancelled(JobError):
    """The job ended CANCELLED."""

    exit_code = 11


_BY_CODE: dict[grpc.StatusCode, type[EdgepruneError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
}


def _status_details(trailers: Iterable[tuple[str, str | bytes]] | None) -> status_pb2.Status | None:
    """The google.rpc.Status sent in the trailing metadata, or None when absent or unreadable."""
    for key, value in trailers or ():
        if key == _DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status()
            try:
                status.ParseFromString(value)
            except DecodeError:
                return None
            return status
    return None


_CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def _details(status: status_pb2.Status) -> dict[str, Any]:
    """ErrorInfo and BadRequest of a google.rpc.Status, as constructor keywords."""
    out: dict[str, Any] = {"violations": []}
    for any_detail in status.details:
        info = error_details_pb2.ErrorInfo()
        bad = error_details_pb2.BadRequest()
        if any_detail.Is(info.DESCRIPTOR) and any_detail.Unpack(info):
            out.update(reason=info.reason, domain=info.domain, metadata=dict(info.metadata))
        elif any_detail.Is(bad.DESCRIPTOR) and any_detail.Unpack(bad):
            out["violations"].extend(
                FieldViolation(v.field, v.description, v.reason) for v in bad.field_violations
            )
    return out


def from_rpc_error(error: grpc.RpcError) -> EdgepruneError:
    """Convert a failed call (sync ``grpc.RpcError`` or ``grpc.aio.AioRpcError``) to our tree."""
    code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
    message: str = error.details() or code.name  # type: ignore[attr-defined]
    details: dict[str, Any] = {}
    status = _status_details(error.trailing_metadata())  # type: ignore[attr-defined]
    if status is not None:
        message = status.message or message
        details = _details(status)
    return _BY_CODE.get(code, ServerError)(message, code=code, **details)


def job_error(job: Any) -> JobError:
    """The error for a job that ended FAILED (its google.rpc.Status) or CANCELLED."""
    if job.state == job_pb2.JOB_STATE_CANCELLED:
        return JobCancelled(f"{job.name} was cancelled", job=job)
    status = job.error
    return JobFailed(
        f"{job.name} failed: {status.message or 'no error message'}",
        job=job,
        code=_CODE_BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN),
        **_details(status),
    )
