"""OpenTelemetry traces: a job submitted over gRPC and run by a worker is one trace (the RPC's
span, the storage calls, the worker's job span with its lease, model load, phases and stored
result), exported through the SDK's in-memory exporter by an API and a worker in this process.
With tracing off, nothing of OpenTelemetry is imported."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from edgeprune.service import tracing
from edgeprune.service.config import Config
from edgeprune.service.server import build
from edgeprune.service.worker import Worker
from edgeprune.storage import Database
from edgeprune.v1 import job_pb2, job_pb2_grpc
from tests.service.harness import MODEL, edge_pruning_spec, wait_for


@pytest.fixture
def traced(tmp_path: Path, tiny_gpt2_dir: Path) -> Iterator[tuple[Any, InMemorySpanExporter]]:
    """An API (its own event loop thread) and a worker (a thread), tracing in memory."""
    exporter = InMemorySpanExporter()
    tracing.install(SimpleSpanProcessor(exporter), "edgeprune-test")
    url = f"sqlite:///{tmp_path / 'edgeprune.db'}"
    config = Config(host="127.0.0.1", port=0, metrics_port=-1, database_url=url,
                    models={MODEL: f"hf:{tiny_gpt2_dir}"}, workers=0, device="cpu", threads=1,
                    lease_s=5, heartbeat_s=0.3, poll_s=0.05, default_steps=4,
                    default_examples=16, default_batch_size=8,
                    auth_tokens=("alice=tok-alice",), insecure=True)
    db = Database(url)
    db.migrate()
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def start() -> Any:
        api = build(config, db)
        await api.server.start()
        return api

    api = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    worker = Worker(config, Database(url), worker_id="traced-worker")
    thread = threading.Thread(target=worker.run_forever, daemon=True)
    thread.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{api.port}")
    try:
        yield job_pb2_grpc.JobServiceStub(channel), exporter
    finally:
        channel.close()
        worker.drain()
        thread.join(timeout=30)
        asyncio.run_coroutine_threadsafe(api.server.stop(0), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        tracing.shutdown()
        worker.queue.db.dispose()
        db.dispose()


AUTH = (("authorization", "Bearer tok-alice"),)


def test_a_submitted_job_and_its_worker_run_are_one_trace(traced: Any) -> None:
    jobs, exporter = traced
    job = jobs.SubmitJob(job_pb2.SubmitJobRequest(spec=edge_pruning_spec(steps=4)), timeout=60,
                         metadata=AUTH)

    def succeeded() -> bool:
        state = jobs.GetJob(job_pb2.GetJobRequest(name=job.name), timeout=10,
                            metadata=AUTH).state
        assert state in (job_pb2.JOB_STATE_PENDING, job_pb2.JOB_STATE_RUNNING,
                         job_pb2.JOB_STATE_SUCCEEDED), state
        return state == job_pb2.JOB_STATE_SUCCEEDED

    wait_for(succeeded, timeout=120, every=0.1, what="the job")

    def with_job_span() -> Any:
        spans = exporter.get_finished_spans()
        return spans if "job.run" in {s.name for s in spans} else None

    spans = wait_for(with_job_span, timeout=30, what="the job span")
    by_name = {span.name: span for span in spans}
    rpc = by_name["edgeprune.v1.JobService/SubmitJob"]
    assert rpc.attributes["rpc.method"] == "SubmitJob"
    assert rpc.attributes["rpc.grpc.status_code"] == "OK"
    assert rpc.attributes["enduser.id"] == "alice"
    assert rpc.resource.attributes["service.name"] == "edgeprune-test"

    run = by_name["job.run"]
    assert run.context.trace_id == rpc.context.trace_id  # carried through the database
    assert run.attributes["job.id"] == job.name.removeprefix("jobs/")
    assert by_name["storage.job.create"].parent.span_id == rpc.context.span_id
    for child in ("storage.queue.claim", "model.load", "storage.queue.complete"):
        assert by_name[child].parent.span_id == run.context.span_id, child
        assert run.start_time <= by_name[child].start_time <= by_name[child].end_time <= run.end_time
    phases = [event.name for event in run.events]
    assert "phase load_model" in phases and "phase prune" in phases, phases
    # a call outside the submit's trace is a trace of its own
    get = [s for s in spans if s.name == "edgeprune.v1.JobService/GetJob"]
    assert get and get[0].context.trace_id != rpc.context.trace_id


def test_a_refused_call_is_traced_with_its_status(traced: Any) -> None:
    jobs, exporter = traced
    with pytest.raises(grpc.RpcError) as caught:
        jobs.GetJob(job_pb2.GetJobRequest(name="jobs/nope"), timeout=10)  # no token
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # the span ends as the server finishes the call, a moment after the client has its answer
    (span,) = wait_for(lambda: [s for s in exporter.get_finished_spans()
                                if s.name == "edgeprune.v1.JobService/GetJob"],
                       timeout=10, what="the GetJob span")
    assert span.attributes["rpc.grpc.status_code"] == "UNAUTHENTICATED"
    assert "enduser.id" not in span.attributes


def test_tracing_off_imports_nothing_of_opentelemetry() -> None:
    code = """
import sys
from edgeprune.service import interceptors, tracing
from edgeprune.service.config import Config
assert tracing.enable(Config(), "x") is False
with tracing.span("a", x=1):
    tracing.event("b")
assert tracing.carrier() == {}
assert not [m for m in sys.modules if m.startswith("opentelemetry")], sys.modules
"""
    env = {"PATH": "/usr/bin:/bin"}  # no OTEL_EXPORTER_OTLP_ENDPOINT
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=env, check=False)
    assert out.returncode == 0, out.stderr
