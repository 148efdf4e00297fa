"""Errors of the service and the one place that maps every error onto a gRPC status.

Handlers raise the `ServiceError` subclasses below; storage and engine raise their own trees
(`edgeprune.storage.errors`, `edgeprune.engine.errors`). `to_status` turns any of them into a
google.rpc.Status carrying an ErrorInfo (reason, domain) and, for bad input, a BadRequest whose
field violations name the request field at fault as a proto path (``spec.sizes[0].edge_sparsity``).
Anything unexpected becomes INTERNAL with a generic message (the traceback goes to the log only).

    ServiceError                      code
    ├── InvalidArgument(msg, field=)  INVALID_ARGUMENT  (+ BadRequest; several via `violations`)
    ├── NotFound                      NOT_FOUND
    ├── AlreadyExists                 ALREADY_EXISTS
    ├── FailedPrecondition            FAILED_PRECONDITION
    ├── ResourceExhausted             RESOURCE_EXHAUSTED
    ├── Unauthenticated               UNAUTHENTICATED
    └── Unavailable                   UNAVAILABLE
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from edgeprune.engine import errors as engine_errors
from edgeprune.storage import errors as storage_errors

log = logging.getLogger(__name__)

DOMAIN = "edgeprune.dev"


class ServiceError(Exception):
    """An error with a canonical code name (google.rpc.Code) and an ErrorInfo reason."""

    code = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None,
                 violations: Sequence[tuple[str, str]] = (),
                 metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.code
        self.violations = list(violations)  # (field path, description)
        self.metadata = dict(metadata or {})  # ErrorInfo.metadata (e.g. a memory estimate)


class InvalidArgument(ServiceError):
    """A request field is wrong: ``field`` is its proto path."""

    code = "INVALID_ARGUMENT"

    def __init__(self, message: str, *, field: str, reason: str | None = None) -> None:
        full = message if message.startswith(f"{field}:") else f"{field}: {message}"
        super().__init__(full, reason=reason, violations=[(field, message)])
        self.field = field


class NotFound(ServiceError):
    code = "NOT_FOUND"


class AlreadyExists(ServiceError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(ServiceError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(ServiceError):
    code = "RESOURCE_EXHAUSTED"


class Unauthenticated(ServiceError):
    code = "UNAUTHENTICATED"


class PermissionDenied(ServiceError):
    code = "PERMISSION_DENIED"


class Unavailable(ServiceError):
    code = "UNAVAILABLE"


def classify(exc: BaseException) -> ServiceError:
    """Any exception as a `ServiceError` (storage and engine errors keep their meaning)."""
    if isinstance(exc, ServiceError):
        return exc
    message = str(exc)
    match exc:
        case storage_errors.NotFound():
            return NotFound(message, reason=f"{exc.kind.upper()}_NOT_FOUND")
        case storage_errors.AlreadyExists():
            return AlreadyExists(message, reason=f"{exc.kind.upper()}_ALREADY_EXISTS")
        case storage_errors.LeaseLost():
            return _coded("ABORTED", message, "LEASE_LOST")
        case storage_errors.Conflict():
            return FailedPrecondition(message)
        case storage_errors.InvalidArgument() | engine_errors.InvalidArgument():
            return InvalidArgument(message, field=getattr(exc, "field", None) or "request")
        case storage_errors.IntegrityError():
            return _coded("DATA_LOSS", message, "INTEGRITY_CHECK_FAILED")
        case storage_errors.Unavailable():
            # Storage's message names the condition only; the driver's text (host, port,
            # database, user) is its `detail`, which goes to the server's log (`abort`).
            return Unavailable(message, reason="DATABASE_UNAVAILABLE")
        case engine_errors.ModelNotFound():
            return FailedPrecondition(message, reason="MODEL_NOT_FOUND")
        case engine_errors.UnsupportedArchitecture():
            return FailedPrecondition(message, reason="UNSUPPORTED_ARCHITECTURE")
        case engine_errors.NotSupported():
            return FailedPrecondition(message, reason="NOT_SUPPORTED")
        case engine_errors.ResourceExhausted() | MemoryError():
            return ResourceExhausted(message or "out of memory", reason="OUT_OF_MEMORY")
    return ServiceError("internal error", reason="INTERNAL")


def _coded(code: str, message: str, reason: str) -> ServiceError:
    error = ServiceError(message, reason=reason)
    error.code = code
    return error


def to_status(exc: BaseException) -> status_pb2.Status:
    """The google.rpc.Status for an exception, with ErrorInfo and BadRequest details."""
    error = classify(exc)
    status = status_pb2.Status(code=code_pb2.Code.Value(error.code), message=error.message)
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN,
                                       metadata=error.metadata)
    status.details.add().Pack(info)
    if error.violations:
        bad = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
            for f, d in error.violations
        ])
        status.details.add().Pack(bad)
    retry_after_s = getattr(exc, "retry_after_s", None)
    if error.code == "UNAVAILABLE" and retry_after_s:  # storage's hint: a lock passes sooner
        delay = duration_pb2.Duration()
        delay.FromTimedelta(timedelta(seconds=retry_after_s))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return status


def status_of_job_error(message: str, reason: str | None) -> status_pb2.Status:
    """The Status of a failed job, from what the worker stored (reason = a code name)."""
    code = reason if reason in set(code_pb2.Code.keys()) else "INTERNAL"
    status = status_pb2.Status(code=code_pb2.Code.Value(code), message=message)
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason or code, domain=DOMAIN))
    return status


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """End the call with the status of ``exc`` (raises grpc's AbortError)."""
    if classify(exc).code == "INTERNAL":
        log.error("internal error: %r", exc, exc_info=exc)
    elif isinstance(exc, storage_errors.Unavailable):
        log.warning("%s: %s", exc, getattr(exc, "detail", "") or "no detail")
    await context.abort_with_status(rpc_status.to_status(to_status(exc)))


def unary(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Decorate a unary (or client-streaming) servicer method: errors -> status."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - every error leaves as a status
            await abort(context, exc)

    return wrapper


def streaming(fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    """Decorate a server-streaming servicer method: errors -> status."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in fn(self, request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001
            await abort(context, exc)

    return wrapper
