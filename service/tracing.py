"""OpenTelemetry traces of the API and the workers, off unless an OTLP endpoint is configured.

`enable(config, service)` runs once per process (`serve`, `worker`). With neither ``otlp_endpoint``
nor ``OTEL_EXPORTER_OTLP_ENDPOINT`` set it returns False and nothing of OpenTelemetry is ever
imported: `span` hands back one shared null context and `event` / `carrier` return at once.

With tracing on, spans go in batches to the OTLP/gRPC collector:

- every RPC on the API (`TracingInterceptor`: method, principal, status code), continuing the
  caller's trace when its metadata carries a W3C ``traceparent``;
- the storage calls that matter, as children of the RPC or the job (job create, lease, complete;
  dataset insert);
- each job attempt on a worker (``job.run``: the lease, the model load, phases as events, the
  stored result), in the trace of the SubmitJob call that created the job: the API stores the
  call's W3C trace context with the job's first event and the worker continues it.

Tests install an in-memory exporter with `install`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from typing import Any

from edgeprune.service.config import Config

log = logging.getLogger(__name__)

ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
_NULL = contextlib.nullcontext()
_tracer: Any = None  # an opentelemetry Tracer once enabled
_provider: Any = None


def endpoint(config: Config) -> str:
    return config.otlp_endpoint or os.environ.get(ENDPOINT_ENV, "")


def enable(config: Config, service: str) -> bool:
    """Trace to the configured OTLP collector; False (and nothing imported) without one."""
    target = endpoint(config)
    if not target:
        return False
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    install(BatchSpanProcessor(OTLPSpanExporter(endpoint=target)), service)
    log.info("tracing to %s", target)
    return True


def install(processor: Any, service: str) -> None:
    """Send this process's spans through ``processor`` (an SDK SpanProcessor)."""
    global _tracer, _provider
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    _provider = TracerProvider(resource=Resource.create({"service.name": service}))
    _provider.add_span_processor(processor)
    _tracer = _provider.get_tracer("edgeprune")


def shutdown() -> None:
    """Send what is buffered and stop tracing (process exit)."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


def enabled() -> bool:
    return _tracer is not None


def span(name: str, *, parent: Mapping[str, str] | None = None, server: bool = False,
         start_ns: int | None = None, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
    """A span around a block, current inside it (its children nest under it); ``parent``: a
    W3C carrier (`carrier`) to continue instead of the current span. Off: a null context."""
    if _tracer is None:
        return _NULL
    from opentelemetry import trace
    from opentelemetry.propagate import extract

    kind = trace.SpanKind.SERVER if server else trace.SpanKind.INTERNAL
    context = extract(dict(parent)) if parent else None
    return _tracer.start_as_current_span(name, context=context, kind=kind, start_time=start_ns,
                                         attributes=_clean(attributes))


def record_span(name: str, start_ns: int, end_ns: int, **attributes: Any) -> None:
    """A finished child of the current span, timed by the caller (a call made before the
    span it belongs to was known, such as the claim that found the job)."""
    if _tracer is None:
        return
    child = _tracer.start_span(name, start_time=start_ns, attributes=_clean(attributes))
    child.end(end_time=end_ns)


def event(name: str, **attributes: Any) -> None:
    """An event on the current span."""
    if _tracer is None:
        return
    from opentelemetry import trace

    trace.get_current_span().add_event(name, _clean(attributes))


def set_attributes(target: Any, **attributes: Any) -> None:
    """Attributes on a span that `span` returned (None when off)."""
    if target is not None:
        target.set_attributes(_clean(attributes))


def carrier() -> dict[str, str]:
    """The current trace context as W3C headers (``traceparent``), {} when off or outside."""
    if _tracer is None:
        return {}
    from opentelemetry.propagate import inject

    out: dict[str, str] = {}
    inject(out)
    return out


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes OpenTelemetry can hold (str, bool, int, float); None and the like go."""
    return {k: v for k, v in attributes.items() if isinstance(v, (str, bool, int, float))}
