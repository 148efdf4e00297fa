"""A job's and a circuit's life over a real server, on SQLite and PostgreSQL: what cancelling
says on the event stream, how fast cancel and drain act during the warm start, DeleteJob and
DeleteCircuit, retention and the scheduled blob cleanup, sizes given as percentages, and server
reflection under both of its names."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from edgeprune.storage import BlobStore, CircuitRepo, Database
from edgeprune.v1 import circuit_pb2, job_pb2
from tests.service.conftest import database_url, running
from tests.service.errors import fails
from tests.service.harness import Server, edge_pruning_spec, inline_examples, wait_for

PROMPT_S = 5.0  # "within a few seconds": cancel and drain between two warm-start passes


def submit(server: Server, spec: job_pb2.JobSpec) -> job_pb2.Job:
    return server.jobs.SubmitJob(job_pb2.SubmitJobRequest(spec=spec), timeout=30)


def big_warm_start() -> job_pb2.JobSpec:
    spec = edge_pruning_spec(steps=5)
    spec.edge_pruning.warm_start_ig_steps = 1000  # thousands of passes: it never ends by itself
    return spec


def wait_for_phase(server: Server, name: str, phase: str) -> job_pb2.JobEvent:
    for event in server.watch(name):
        if event.progress.phase == phase and event.progress.step >= 1:
            return event
    raise AssertionError(f"{name} ended before its {phase} phase")


def states(events: list[job_pb2.JobEvent]) -> list[tuple[int, str]]:
    return [(e.state_change.state, e.state_change.reason) for e in events
            if e.HasField("state_change")]


def evaluation(circuit: str) -> circuit_pb2.EvaluateCircuitRequest:
    return circuit_pb2.EvaluateCircuitRequest(
        evaluation=job_pb2.EvaluationSpec(circuit=circuit, data=inline_examples(8), batch_size=4))


# ------------------------------------------------------------------------------- cancelling


def test_cancelling_a_running_job_never_reads_as_a_requeue(live_server: Server) -> None:
    """RUNNING, then the request ("cancel requested", still RUNNING), then CANCELLED: no
    PENDING after the job started, which would look like a worker giving it back."""
    job = submit(live_server, edge_pruning_spec(steps=1000))
    wait_for_phase(live_server, job.name, "prune")
    live_server.jobs.CancelJob(job_pb2.CancelJobRequest(name=job.name), timeout=30)
    events = list(live_server.watch(job.name))
    changes = states(events)
    assert changes[0][0] == job_pb2.JOB_STATE_PENDING
    assert job_pb2.JOB_STATE_PENDING not in [state for state, _ in changes[1:]], changes
    assert (job_pb2.JOB_STATE_RUNNING, "cancel requested") in changes
    assert changes[-1][0] == job_pb2.JOB_STATE_CANCELLED
    final = events[-1].state_change
    assert final.error.message == "cancelled by request"


def test_a_cancel_during_the_warm_start_lands_within_seconds(live_server: Server) -> None:
    job = submit(live_server, big_warm_start())
    wait_for_phase(live_server, job.name, "warm_start")
    started = time.monotonic()
    live_server.jobs.CancelJob(job_pb2.CancelJobRequest(name=job.name), timeout=30)
    done = live_server.wait_done(job.name, timeout=60)
    assert done.state == job_pb2.JOB_STATE_CANCELLED
    assert time.monotonic() - started < PROMPT_S


def test_a_drain_during_the_warm_start_gives_the_job_back_within_seconds(
    backend: str, tmp_path: Path, tiny_gpt2_dir: Path
) -> None:
    """SIGTERM while the warm start runs: the server exits long before its drain grace (15 s)
    and the job is PENDING again for another worker."""
    with database_url(backend, tmp_path) as url:
        with running(tmp_path / "a", url, tiny_gpt2_dir) as server:
            job = submit(server, big_warm_start())
            wait_for_phase(server, job.name, "warm_start")
            started = time.monotonic()
            assert server.stop(signal.SIGTERM) == 0
            assert time.monotonic() - started < PROMPT_S + 2.0
        with running(tmp_path / "b", url, tiny_gpt2_dir, workers=0) as server:
            after = server.jobs.GetJob(job_pb2.GetJobRequest(name=job.name), timeout=30)
            assert after.state == job_pb2.JOB_STATE_PENDING


# ------------------------------------------------------------------------------- DeleteJob


def test_delete_job_refuses_a_job_that_may_run_and_deletes_a_finished_one(
    api_server: Server,
) -> None:
    job = submit(api_server, edge_pruning_spec())  # no workers: it stays PENDING
    request = job_pb2.DeleteJobRequest(name=job.name)
    assert fails(api_server.jobs.DeleteJob, request) == (
        "FAILED_PRECONDITION", "JOB_NOT_FINISHED", [])
    api_server.jobs.CancelJob(job_pb2.CancelJobRequest(name=job.name), timeout=30)
    api_server.jobs.DeleteJob(request, timeout=30)
    get = job_pb2.GetJobRequest(name=job.name)
    assert fails(api_server.jobs.GetJob, get)[0] == "NOT_FOUND"
    watch = job_pb2.WatchJobRequest(name=job.name)
    assert fails(lambda: list(api_server.jobs.WatchJob(watch, timeout=30)))[0] == "NOT_FOUND"
    assert fails(api_server.jobs.DeleteJob, request)[0] == "NOT_FOUND"
    code, _, fields = fails(api_server.jobs.DeleteJob, job_pb2.DeleteJobRequest())
    assert (code, fields) == ("INVALID_ARGUMENT", ["name"])


def test_deleting_a_job_keeps_its_circuits(live_server: Server) -> None:
    job = live_server.wait_done(submit(live_server, edge_pruning_spec(steps=3)).name)
    (name,) = job.result.circuits
    live_server.jobs.DeleteJob(job_pb2.DeleteJobRequest(name=job.name), timeout=30)
    circuit = live_server.circuits.GetCircuit(circuit_pb2.GetCircuitRequest(name=name), timeout=30)
    assert circuit.job == "" and circuit.edge_count > 0
    chunks = live_server.circuits.ExportCircuit(
        circuit_pb2.ExportCircuitRequest(name=name, format=circuit_pb2.EXPORT_FORMAT_SAFETENSORS),
        timeout=60)
    assert b"".join(c.data for c in chunks)  # its masks stay with it


# --------------------------------------------------------------------------- DeleteCircuit


def test_delete_circuit_and_a_circuit_a_queued_evaluation_reads(live_server: Server) -> None:
    job = live_server.wait_done(submit(live_server, edge_pruning_spec(steps=3)).name)
    (name,) = job.result.circuits
    blocker = submit(live_server, edge_pruning_spec(steps=1000))  # holds the only worker
    wait_for_phase(live_server, blocker.name, "prune")
    reader = live_server.circuits.EvaluateCircuit(evaluation(name), timeout=30)
    delete = circuit_pb2.DeleteCircuitRequest(name=name)
    try:
        assert fails(live_server.circuits.DeleteCircuit, delete)[:2] == (
            "FAILED_PRECONDITION", "CIRCUIT_IN_USE")
    finally:
        for pending in (reader, blocker):
            live_server.jobs.CancelJob(job_pb2.CancelJobRequest(name=pending.name), timeout=30)
    live_server.wait_done(reader.name)
    live_server.circuits.DeleteCircuit(delete, timeout=30)
    get = circuit_pb2.GetCircuitRequest(name=name)
    assert fails(live_server.circuits.GetCircuit, get)[0] == "NOT_FOUND"
    assert fails(live_server.circuits.DeleteCircuit, delete)[0] == "NOT_FOUND"
    listed = live_server.circuits.ListCircuits(circuit_pb2.ListCircuitsRequest(job=job.name))
    assert not listed.circuits
    assert fails(live_server.circuits.DeleteCircuit,
                 circuit_pb2.DeleteCircuitRequest(name="jobs/1"))[0] == "INVALID_ARGUMENT"


# ------------------------------------------------------------------- retention and cleanup


def test_retention_and_the_blob_cleanup(backend: str, tmp_path: Path,
                                        tiny_gpt2_dir: Path) -> None:
    """Finished jobs older than job_retention_days go on the cleanup's schedule (their
    circuits stay); a deleted circuit's mask blob goes once nothing refers to it and it is
    older than blob_grace_s."""
    retention_s, grace_s = 2.0, 1.0
    with database_url(backend, tmp_path) as url, running(
        tmp_path, url, tiny_gpt2_dir, cleanup_interval_s=0.3, blob_grace_s=grace_s,
        job_retention_days=retention_s / 86400,
    ) as server:
        db = Database(url)
        try:
            job = server.wait_done(submit(server, edge_pruning_spec(steps=3)).name)
            assert job.state == job_pb2.JOB_STATE_SUCCEEDED
            (name,) = job.result.circuits
            circuit_id = name.removeprefix("circuits/")
            mask = CircuitRepo(db).get(circuit_id, full=False).mask_blob
            assert mask is not None

            def job_gone() -> bool:
                try:
                    server.jobs.GetJob(job_pb2.GetJobRequest(name=job.name), timeout=30)
                except grpc.RpcError as err:
                    return err.code() == grpc.StatusCode.NOT_FOUND
                return False

            wait_for(job_gone, timeout=30, what="the retention to delete the job")
            circuit = server.circuits.GetCircuit(circuit_pb2.GetCircuitRequest(name=name))
            assert circuit.job == ""
            time.sleep(grace_s + 1.0)  # past the grace and a few cleanup passes
            assert BlobStore(db).exists(mask)  # still the circuit's

            server.circuits.DeleteCircuit(circuit_pb2.DeleteCircuitRequest(name=name), timeout=30)
            wait_for(lambda: not BlobStore(db).exists(mask), timeout=30,
                     what="the cleanup to free the mask blob")
        finally:
            db.dispose()


# ----------------------------------------------------------------------- percentage sizes


def test_percentage_sizes_are_rounded_edge_counts(live_server: Server) -> None:
    """A sparsity keeps round((1 - sparsity) * edges) live edges, for every size of a sweep
    (0.8 travels as the float32 0.80000001: a floor of 0.19999999 * 140 edges would give 27)."""
    sparsities = (0.5, 0.8)
    job = live_server.wait_done(
        submit(live_server, edge_pruning_spec(steps=3, sizes=sparsities)).name)
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job.error.message
    circuits = [live_server.circuits.GetCircuit(circuit_pb2.GetCircuitRequest(name=n))
                for n in job.result.circuits]
    counts = sorted((c.edge_count for c in circuits), reverse=True)
    total = circuits[0].total_edge_count
    assert counts == [round((1 - s) * total) for s in sparsities]


# ------------------------------------------------------------------------------- reflection


def _reflect(channel: grpc.Channel, method: str,
             *requests: reflection_pb2.ServerReflectionRequest,
             ) -> list[reflection_pb2.ServerReflectionResponse]:
    call = channel.stream_stream(
        method, request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    return list(call(iter(requests), timeout=30))


@pytest.mark.parametrize("package", ["grpc.reflection.v1", "grpc.reflection.v1alpha"])
def test_reflection_answers_under_both_names(api_server: Server, package: str) -> None:
    """The same questions get the same answers from v1 (what grpcurl asks first) and v1alpha;
    the messages of both protocols are the same on the wire."""
    assert api_server.channel is not None
    method = f"/{package}.ServerReflection/ServerReflectionInfo"
    listed, job_file, v1_file = _reflect(
        api_server.channel, method,
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="edgeprune.v1.JobService"),
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="grpc.reflection.v1.ServerReflection"))
    services = {s.name for s in listed.list_services_response.service}
    assert {"edgeprune.v1.JobService", "edgeprune.v1.CircuitService", "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= services
    assert job_file.file_descriptor_response.file_descriptor_proto
    assert not v1_file.HasField("error_response")
    assert v1_file.file_descriptor_response.file_descriptor_proto


def test_a_reflection_client_describes_the_api(api_server: Server) -> None:
    """grpcio-reflection's own client (v1alpha) rebuilds the API, DeleteJob included."""
    database = ProtoReflectionDescriptorDatabase(api_server.channel)
    assert "grpc.reflection.v1.ServerReflection" in database.get_services()
    pool = DescriptorPool(database)
    service = pool.FindServiceByName("edgeprune.v1.JobService")
    assert {"SubmitJob", "CancelJob", "DeleteJob"} <= set(service.methods_by_name)
    assert "DeleteCircuit" in pool.FindServiceByName("edgeprune.v1.CircuitService").methods_by_name
    reflection_v1 = pool.FindServiceByName("grpc.reflection.v1.ServerReflection")
    assert reflection_v1.methods[0].input_type.full_name == (
        "grpc.reflection.v1.ServerReflectionRequest")
