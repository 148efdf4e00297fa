"""Tenancy over a real server: each principal sees and changes only its own jobs, datasets and
circuits, admins see all, priorities are capped per principal (both backends)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from edgeprune.v1 import circuit_pb2, dataset_pb2, job_pb2
from tests.service.conftest import database_url, running
from tests.service.errors import fails
from tests.service.harness import Server, edge_pruning_spec, wait_for

ALICE, BOB, OPS, BARE = "alice-token-0123456789", "bob-token-0123456789", \
    "ops-token-0123456789", "bare-token-0123456789"
EXAMPLE = {"clean": "When Mary and John went to the store, John gave a drink to",
           "corrupted": "When Mary and John went to the store, Tom gave a drink to",
           "target": " Mary", "distractor": " John"}


def auth(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


@pytest.fixture(scope="module")
def server(backend: str, tmp_path_factory: pytest.TempPathFactory,
           tiny_gpt2_dir: Path) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp(f"tenancy-{backend}")
    tokens = folder / "tokens"
    tokens.write_text(f"# principals\nalice={ALICE}\nbob:user:3={BOB}\nops:admin={OPS}\n{BARE}\n")
    with database_url(backend, folder) as url, running(
            folder, url, tiny_gpt2_dir, auth_token_file=str(tokens), insecure="true") as srv:
        yield srv


def upload(server: Server, token: str, examples: list[dict], request_id: str = "") -> dataset_pb2.Dataset:
    content = "\n".join(json.dumps(e) for e in examples).encode()
    parts = [dataset_pb2.UploadDatasetRequest(metadata=dataset_pb2.DatasetMetadata(
        display_name="d", request_id=request_id)), dataset_pb2.UploadDatasetRequest(chunk=content)]
    return server.datasets.UploadDataset(iter(parts), metadata=auth(token), timeout=60)


def submit(server: Server, token: str, spec: job_pb2.JobSpec, priority: int = 0) -> job_pb2.Job:
    return server.jobs.SubmitJob(job_pb2.SubmitJobRequest(spec=spec, priority=priority),
                                 metadata=auth(token), timeout=60)


def test_a_principal_sees_only_its_own_and_an_admin_sees_all(server: Server) -> None:
    dataset = upload(server, ALICE, [EXAMPLE] * 8)
    spec = edge_pruning_spec(steps=4)
    spec.data.Clear()
    spec.data.dataset = dataset.name
    job = submit(server, ALICE, spec)

    def done() -> job_pb2.Job | None:
        got = server.jobs.GetJob(job_pb2.GetJobRequest(name=job.name), metadata=auth(ALICE),
                                 timeout=30)
        return got if got.state >= job_pb2.JOB_STATE_SUCCEEDED else None

    finished = wait_for(done, timeout=180, what="alice's job")
    assert finished.state == job_pb2.JOB_STATE_SUCCEEDED, finished.error
    circuit = finished.result.circuits[0]

    # Bob's view: alice's resources answer exactly as missing ones do.
    missing = {
        "job": fails(server.jobs.GetJob, job_pb2.GetJobRequest(name="jobs/" + "0" * 32),
                     metadata=auth(BOB), timeout=30),
        "dataset": fails(server.datasets.GetDataset,
                         dataset_pb2.GetDatasetRequest(name="datasets/nope"),
                         metadata=auth(BOB), timeout=30),
        "circuit": fails(server.circuits.GetCircuit,
                         circuit_pb2.GetCircuitRequest(name="circuits/999999"),
                         metadata=auth(BOB), timeout=30),
    }
    assert fails(server.jobs.GetJob, job_pb2.GetJobRequest(name=job.name), metadata=auth(BOB),
                 timeout=30) == missing["job"]
    assert fails(server.jobs.CancelJob, job_pb2.CancelJobRequest(name=job.name),
                 metadata=auth(BOB), timeout=30) == missing["job"]
    with pytest.raises(grpc.RpcError) as err:
        list(server.jobs.WatchJob(job_pb2.WatchJobRequest(name=job.name), metadata=auth(BOB),
                                  timeout=30))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert fails(server.datasets.GetDataset, dataset_pb2.GetDatasetRequest(name=dataset.name),
                 metadata=auth(BOB), timeout=30) == missing["dataset"]
    assert fails(server.datasets.DeleteDataset, dataset_pb2.DeleteDatasetRequest(
        name=dataset.name), metadata=auth(BOB), timeout=30) == missing["dataset"]
    assert fails(server.circuits.GetCircuit, circuit_pb2.GetCircuitRequest(name=circuit),
                 metadata=auth(BOB), timeout=30) == missing["circuit"]
    assert fails(lambda: list(server.circuits.ExportCircuit(circuit_pb2.ExportCircuitRequest(
        name=circuit, format=circuit_pb2.EXPORT_FORMAT_JSON), metadata=auth(BOB), timeout=30))
    )[0] == "NOT_FOUND"
    assert fails(server.circuits.CompareCircuits, circuit_pb2.CompareCircuitsRequest(
        first=circuit, second=circuit), metadata=auth(BOB), timeout=30)[0] == "NOT_FOUND"
    evaluation = job_pb2.EvaluationSpec(circuit=circuit)
    evaluation.data.CopyFrom(edge_pruning_spec().data)
    assert fails(server.circuits.EvaluateCircuit, circuit_pb2.EvaluateCircuitRequest(
        evaluation=evaluation), metadata=auth(BOB), timeout=30)[0] == "NOT_FOUND"
    code, reason, _ = fails(submit, server, BOB, spec)  # alice's dataset by name
    assert (code, reason) == ("NOT_FOUND", "DATASET_NOT_FOUND")
    for call, request, field in (
            (server.jobs.ListJobs, job_pb2.ListJobsRequest(), "jobs"),
            (server.datasets.ListDatasets, dataset_pb2.ListDatasetsRequest(), "datasets"),
            (server.circuits.ListCircuits, circuit_pb2.ListCircuitsRequest(), "circuits")):
        assert list(getattr(call(request, metadata=auth(BOB), timeout=30), field)) == []
        assert len(getattr(call(request, metadata=auth(ALICE), timeout=30), field)) >= 1

    # Nothing bob tried changed alice's resources; the admin sees and can act on them.
    got = server.datasets.GetDataset(dataset_pb2.GetDatasetRequest(name=dataset.name),
                                     metadata=auth(OPS), timeout=30)
    assert got.example_count == 8
    assert server.circuits.GetCircuit(circuit_pb2.GetCircuitRequest(name=circuit),
                                      metadata=auth(OPS), timeout=30).name == circuit
    bobs = submit(server, BOB, edge_pruning_spec(steps=4))
    listed = {j.name for j in server.jobs.ListJobs(job_pb2.ListJobsRequest(),
                                                   metadata=auth(OPS), timeout=30).jobs}
    assert {job.name, bobs.name} <= listed
    server.jobs.CancelJob(job_pb2.CancelJobRequest(name=bobs.name), metadata=auth(OPS), timeout=30)
    # A bare token is its own principal.
    assert list(server.jobs.ListJobs(job_pb2.ListJobsRequest(), metadata=auth(BARE),
                                     timeout=30).jobs) == []


def test_priorities_are_capped_per_principal(server: Server) -> None:
    spec = edge_pruning_spec(steps=4)
    code, reason, fields = fails(submit, server, ALICE, spec, 1)  # users: user_max_priority 0
    assert (code, reason, fields) == ("PERMISSION_DENIED", "PRIORITY_NOT_ALLOWED", ["priority"])
    submit(server, ALICE, spec, -5)
    submit(server, BOB, spec, 3)  # bob's own limit
    assert fails(submit, server, BOB, spec, 4)[0] == "PERMISSION_DENIED"
    high = submit(server, OPS, spec, 100)  # admins: any priority the API allows
    assert high.priority == 100
    for job in server.jobs.ListJobs(job_pb2.ListJobsRequest(states=[job_pb2.JOB_STATE_PENDING]),
                                    metadata=auth(OPS), timeout=30).jobs:
        server.jobs.CancelJob(job_pb2.CancelJobRequest(name=job.name), metadata=auth(OPS),
                              timeout=30)


def test_request_ids_are_scoped_per_principal_and_bound_to_the_content(server: Server) -> None:
    first = upload(server, ALICE, [EXAMPLE] * 2, request_id="upload-1")
    assert upload(server, ALICE, [EXAMPLE] * 2, request_id="upload-1").name == first.name
    code, _, _ = fails(upload, server, ALICE, [EXAMPLE] * 3, request_id="upload-1")
    assert code == "ALREADY_EXISTS"
    bobs = upload(server, BOB, [EXAMPLE] * 3, request_id="upload-1")
    assert bobs.name != first.name and bobs.example_count == 3
    assert server.datasets.GetDataset(dataset_pb2.GetDatasetRequest(name=first.name),
                                      metadata=auth(ALICE), timeout=30).example_count == 2
    # Deleted, the key makes a new dataset under a new name: a job naming the old one would
    # find it gone rather than run on other data.
    server.datasets.DeleteDataset(dataset_pb2.DeleteDatasetRequest(name=first.name),
                                  metadata=auth(ALICE), timeout=30)
    again = upload(server, ALICE, [EXAMPLE] * 4, request_id="upload-1")
    assert again.name != first.name and again.example_count == 4


def test_each_principal_has_its_share_of_the_queue(backend: str, tmp_path: Path,
                                                   tiny_gpt2_dir: Path) -> None:
    """One principal filling its share (3 pending jobs here) leaves the queue open to others;
    admins share only the queue's own cap; a repeated request_id still gets its job."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice={ALICE}\nbob={BOB}\nops:admin={OPS}\n")
    with database_url(backend, tmp_path) as url, running(
            tmp_path, url, tiny_gpt2_dir, workers=0, auth_token_file=str(tokens),
            insecure="true", max_pending_jobs_per_principal=3,
            max_datasets_per_principal=2) as srv:
        spec = edge_pruning_spec(steps=4)
        first = srv.jobs.SubmitJob(job_pb2.SubmitJobRequest(spec=spec, request_id="a-0"),
                                   metadata=auth(ALICE), timeout=60)
        for _ in range(2):
            submit(srv, ALICE, spec)
        code, reason, _ = fails(submit, srv, ALICE, spec)
        assert (code, reason) == ("RESOURCE_EXHAUSTED", "PRINCIPAL_QUEUE_FULL")
        again = srv.jobs.SubmitJob(job_pb2.SubmitJobRequest(spec=spec, request_id="a-0"),
                                   metadata=auth(ALICE), timeout=60)
        assert again.name == first.name
        submit(srv, BOB, spec)  # bob's share is his own
        for _ in range(4):
            submit(srv, OPS, spec)
        srv.jobs.CancelJob(job_pb2.CancelJobRequest(name=first.name), metadata=auth(ALICE),
                           timeout=30)
        submit(srv, ALICE, spec)  # a cancelled job frees its place

        # Datasets: two each; the same upload again is still answered; a delete frees a place.
        kept = upload(srv, ALICE, [EXAMPLE], request_id="d-0")
        upload(srv, ALICE, [EXAMPLE] * 2)
        code, reason, _ = fails(upload, srv, ALICE, [EXAMPLE] * 3)
        assert (code, reason) == ("RESOURCE_EXHAUSTED", "DATASET_QUOTA")
        assert upload(srv, ALICE, [EXAMPLE], request_id="d-0").name == kept.name
        upload(srv, BOB, [EXAMPLE])
        for n in range(3):
            upload(srv, OPS, [EXAMPLE] * (n + 1))
        srv.datasets.DeleteDataset(dataset_pb2.DeleteDatasetRequest(name=kept.name),
                                   metadata=auth(ALICE), timeout=30)
        upload(srv, ALICE, [EXAMPLE] * 3)
