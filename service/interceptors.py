"""Server interceptors: Prometheus RPC metrics (outermost), OpenTelemetry spans (with tracing
on) and bearer-token authentication.

Each wraps the method handler grpc found for a call, whatever its kind (unary or streaming on
either side), so every service — ours, health and reflection — is covered the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc
from grpc_status import rpc_status

from edgeprune.service import decoding, metrics, tracing
from edgeprune.service.errors import Unauthenticated, to_status
from edgeprune.service.principals import Principals, bearer_token

# Health checks (Kubernetes probes) never carry a token.
PUBLIC_SERVICES = ("grpc.health.v1.Health",)
CODES_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def _kind(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    if handler.response_streaming:
        return "server_stream"
    return "unary"


def _behavior_name(handler: grpc.RpcMethodHandler) -> str:
    return {
        "unary": "unary_unary",
        "client_stream": "stream_unary",
        "server_stream": "unary_stream",
        "bidi_stream": "stream_stream",
    }[_kind(handler)]


def _replace(handler: grpc.RpcMethodHandler, behavior: Callable[..., Any],
             request_deserializer: Callable[[bytes], Any] | None = None) -> grpc.RpcMethodHandler:
    """The same handler with its behavior (and optionally its deserializer) swapped."""
    name = _behavior_name(handler)
    factory = getattr(grpc, f"{name}_rpc_method_handler")
    return factory(behavior,
                   request_deserializer=request_deserializer or handler.request_deserializer,
                   response_serializer=handler.response_serializer)


def _split(method: str) -> tuple[str, str]:
    """``/edgeprune.v1.JobService/SubmitJob`` -> (service, method)."""
    _, service, name = method.split("/", 2)
    return service, name


def _code(context: grpc.aio.ServicerContext, exc: BaseException | None) -> str:
    """The status code name a call ended with."""
    code = context.code()
    if isinstance(code, int) and not isinstance(code, grpc.StatusCode):
        code = CODES_BY_VALUE.get(code)
    if isinstance(code, grpc.StatusCode) and code != grpc.StatusCode.OK:
        return code.name
    if exc is None:
        return "OK"
    return "CANCELLED" if isinstance(exc, asyncio.CancelledError) else "UNKNOWN"


# Called when a call ends, with its context and the exception it raised (None if it returned).
Done = Callable[[grpc.aio.ServicerContext, BaseException | None], None]


def _observed(handler: grpc.RpcMethodHandler,
              around: Callable[[], contextlib.AbstractContextManager[Done]]) -> grpc.RpcMethodHandler:
    """``handler`` with each call run inside ``around()``, whose ``Done`` it calls at the end."""
    inner = getattr(handler, _behavior_name(handler))
    if handler.response_streaming and inspect.isasyncgenfunction(inner):
        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with around() as done:
                error = None
                try:
                    async for item in inner(request, context):
                        yield item
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    done(context, error)

        return _replace(handler, streaming)

    # Unary responses, and streams written with context.write() (e.g. health Watch).
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        with around() as done:
            error = None
            try:
                return await inner(request, context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                done(context, error)

    return _replace(handler, unary)


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """grpc_server_started_total / handled_total / handling_seconds per call."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        service, method = _split(details.method)
        labels = (_kind(handler), service, method)

        @contextlib.contextmanager
        def measured() -> Iterator[Done]:
            metrics.GRPC_STARTED.labels(*labels).inc()
            start = time.perf_counter()

            def done(context: grpc.aio.ServicerContext, exc: BaseException | None) -> None:
                code = _code(context, exc)
                metrics.GRPC_HANDLED.labels(*labels, code).inc()
                metrics.GRPC_SECONDS.labels(*labels, code).observe(time.perf_counter() - start)

            yield done

        return _observed(handler, measured)


class TracingInterceptor(grpc.aio.ServerInterceptor):
    """A server span per call (installed only with tracing on): method, principal, status
    code; a call whose metadata carries a W3C ``traceparent`` continues the caller's trace."""

    def __init__(self, principals: Principals) -> None:
        self.principals = principals

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        service, method = _split(details.method)
        metadata = tuple(details.invocation_metadata or ())
        principal = self.principals.of_metadata(metadata)
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
        if principal is not None and principal.name:  # a server without tokens has no names
            attributes["enduser.id"] = principal.name
        parent = {k: v for k, v in metadata if k in ("traceparent", "tracestate")
                  and isinstance(v, str)}

        @contextlib.contextmanager
        def traced() -> Iterator[Done]:
            with tracing.span(details.method.lstrip("/"), parent=parent, server=True,
                              **attributes) as span:
                yield lambda context, exc: tracing.set_attributes(
                    span, **{"rpc.grpc.status_code": _code(context, exc)})

        return _observed(handler, traced)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without one of the configured bearer tokens (UNAUTHENTICATED)."""

    def __init__(self, principals: Principals) -> None:
        self.principals = principals

    def allowed(self, token: str) -> bool:
        return self.principals.resolve(token) is not None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.split("/")[1] in PUBLIC_SERVICES:
            return handler
        if self.allowed(bearer_token(details.invocation_metadata)):
            return handler
        status = rpc_status.to_status(to_status(Unauthenticated(
            "a valid bearer token is required (metadata `authorization: Bearer <token>`)",
            reason="INVALID_TOKEN")))

        if handler.response_streaming:
            async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await context.abort_with_status(status)
                yield  # pragma: no cover - makes this an async generator

            return _replace(handler, deny_stream)

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort_with_status(status)

        return _replace(handler, deny)


class RequestCheckInterceptor(grpc.aio.ServerInterceptor):
    """INVALID_ARGUMENT naming the field, before any servicer runs, for a request whose bytes
    are not its message or whose text the database cannot store (see `decoding`).

    Installed innermost, so metrics count these calls and authentication still comes first.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        inner = getattr(handler, _behavior_name(handler))
        deserializer = decoding.checked(handler.request_deserializer)

        async def admit(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if handler.request_streaming:
                return _admitted(request, context)
            await _refuse_rejected(request, context)
            return request

        if handler.response_streaming and inspect.isasyncgenfunction(inner):
            async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async for item in inner(await admit(request, context), context):
                    yield item

            return _replace(handler, streaming, deserializer)

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await inner(await admit(request, context), context)

        return _replace(handler, unary, deserializer)


async def _refuse_rejected(request: Any, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, decoding.Rejected):
        await context.abort_with_status(rpc_status.to_status(to_status(request.error)))


async def _admitted(requests: Any, context: grpc.aio.ServicerContext) -> Any:
    """A client stream that ends the call at its first rejected message."""
    async for request in requests:
        await _refuse_rejected(request, context)
        yield request
