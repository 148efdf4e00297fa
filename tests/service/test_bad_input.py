"""Input the database cannot hold, or bytes that are no request at all, answered INVALID_ARGUMENT
naming the field, the same on SQLite and PostgreSQL, with nothing stored changed: ids and
integers beyond their columns, forged page tokens, NUL characters, over-long names, seeds the
engine cannot take, corrupt wire data and strings that are not UTF-8."""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import sqlalchemy
import torch

from edgeprune.engine import defaults
from edgeprune.engine.prune import batch_rows
from edgeprune.service.validation import MAX_DISPLAY_NAME
from edgeprune.storage import CircuitRepo, Database, NewCircuit
from edgeprune.storage.db import normalize_url
from edgeprune.storage.limits import MAX_INTEGER, MAX_NAME_LENGTH
from edgeprune.storage.models import Dataset
from edgeprune.v1 import circuit_pb2, dataset_pb2, job_pb2
from tests.service.errors import details, fails
from tests.service.harness import MODEL, Server, edge_pruning_spec, inline_examples

EDGES = ["input->a0.h0", "a0.h0->logits"]


def snapshot(server: Server) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of the server's database."""
    engine = sqlalchemy.create_engine(normalize_url(server.database_url))
    try:
        with engine.connect() as conn:
            tables = sorted(sqlalchemy.inspect(conn).get_table_names())
            return {t: sorted(map(repr, conn.execute(sqlalchemy.text(f"SELECT * FROM {t}"))))
                    for t in tables}
    finally:
        engine.dispose()


@contextlib.contextmanager
def nothing_stored(server: Server) -> Iterator[None]:
    before = snapshot(server)
    yield
    assert snapshot(server) == before


def invalid(server: Server, call: Callable[..., Any], request: Any, field: str) -> None:
    """The call fails with INVALID_ARGUMENT naming ``field`` first, and stores nothing."""
    with nothing_stored(server):
        code, reason, fields = fails(call, request, timeout=30)
    assert (code, fields[:1]) == ("INVALID_ARGUMENT", [field]), (code, reason, fields)
    assert reason


def submit_request(**spec_fields: Any) -> job_pb2.SubmitJobRequest:
    spec = edge_pruning_spec()
    for name, value in spec_fields.items():
        setattr(spec, name, value)
    return job_pb2.SubmitJobRequest(spec=spec)


def forge(token: str, key: list[Any]) -> str:
    """``token`` with its sort key replaced (the filters' fingerprint kept: a valid structure)."""
    data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    data["k"] = key
    raw = json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


# ------------------------------------------------------------------------ ids and integers


@pytest.mark.parametrize("circuit_id", ["99999999999999999999", str(MAX_INTEGER + 1)])
def test_circuit_ids_beyond_the_id_column(api_server: Server, circuit_id: str) -> None:
    name = f"circuits/{circuit_id}"
    circuits = api_server.circuits
    invalid(api_server, circuits.GetCircuit, circuit_pb2.GetCircuitRequest(name=name), "name")
    invalid(api_server, lambda r, **kw: list(circuits.ExportCircuit(r, **kw)),
            circuit_pb2.ExportCircuitRequest(name=name, format=circuit_pb2.EXPORT_FORMAT_JSON),
            "name")
    invalid(api_server, circuits.CompareCircuits,
            circuit_pb2.CompareCircuitsRequest(first=name, second="circuits/1"), "first")
    evaluation = job_pb2.EvaluationSpec(circuit=name, data=inline_examples())
    invalid(api_server, circuits.EvaluateCircuit,
            circuit_pb2.EvaluateCircuitRequest(evaluation=evaluation), "evaluation.circuit")
    # The largest id the column holds is well-formed: merely not there.
    last = circuit_pb2.GetCircuitRequest(name=f"circuits/{MAX_INTEGER}")
    assert fails(circuits.GetCircuit, last)[0] == "NOT_FOUND"


def test_integer_filters_beyond_their_columns(api_server: Server) -> None:
    circuits = api_server.circuits
    for field in ("min_edge_count", "max_edge_count"):
        for value in (MAX_INTEGER + 1, 2**63 - 1):
            request = circuit_pb2.ListCircuitsRequest(**{field: value})
            invalid(api_server, circuits.ListCircuits, request, field)
    circuits.ListCircuits(circuit_pb2.ListCircuitsRequest(max_edge_count=MAX_INTEGER), timeout=30)
    job = api_server.jobs.SubmitJob(submit_request(), timeout=30)
    watch = job_pb2.WatchJobRequest(name=job.name, after_sequence=MAX_INTEGER + 1)
    invalid(api_server, lambda r, **kw: list(api_server.jobs.WatchJob(r, **kw)), watch,
            "after_sequence")


# ------------------------------------------------------------------------- page tokens


def test_forged_circuit_page_tokens(api_server: Server) -> None:
    db = Database(api_server.database_url)
    try:
        for _ in range(2):
            CircuitRepo(db).create(NewCircuit(model=MODEL, method="eap", edges=EDGES,
                                              total_edge_count=4))
    finally:
        db.dispose()
    token = api_server.circuits.ListCircuits(
        circuit_pb2.ListCircuitsRequest(page_size=1), timeout=30).next_page_token
    assert token
    for key in ([2**64], [2**63], [MAX_INTEGER + 1], [-(2**70)], ["7\x00"], [True], [[1]]):
        request = circuit_pb2.ListCircuitsRequest(page_size=1, page_token=forge(token, key))
        invalid(api_server, api_server.circuits.ListCircuits, request, "page_token")
    nested = base64.urlsafe_b64encode(b"[" * 100_000).decode()
    invalid(api_server, api_server.circuits.ListCircuits,
            circuit_pb2.ListCircuitsRequest(page_token=nested), "page_token")


def test_forged_job_page_tokens(api_server: Server) -> None:
    for _ in range(2):
        api_server.jobs.SubmitJob(submit_request(), timeout=30)
    token = api_server.jobs.ListJobs(job_pb2.ListJobsRequest(page_size=1),
                                     timeout=30).next_page_token
    assert token
    created = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))["k"][0]
    for last in ("j\x00", "j\ud800", 2**64, None):
        request = job_pb2.ListJobsRequest(page_size=1, page_token=forge(token, [created, last]))
        invalid(api_server, api_server.jobs.ListJobs, request, "page_token")


# ----------------------------------------------------------------------------- text


def test_nul_characters_anywhere(api_server: Server) -> None:
    jobs, circuits = api_server.jobs, api_server.circuits
    request = submit_request()
    request.labels["team"] = "a\x00b"
    invalid(api_server, jobs.SubmitJob, request, "labels['team']")
    request = submit_request()
    request.spec.data.examples.examples[3].clean += "\x00"
    invalid(api_server, jobs.SubmitJob, request, "spec.data.examples.examples[3].clean")
    request = submit_request()
    request.spec.data.task.name = "ioi"
    request.spec.data.task.params["names\x00"] = "x"
    invalid(api_server, jobs.SubmitJob, request, "spec.data.task.params['names\\x00']")
    request = submit_request()
    request.request_id = "r\x00"
    invalid(api_server, jobs.SubmitJob, request, "request_id")
    for field in ("model", "task", "contains_edge", "contains_node"):
        invalid(api_server, circuits.ListCircuits,
                circuit_pb2.ListCircuitsRequest(**{field: "a\x00"}), field)
    invalid(api_server, jobs.ListJobs, job_pb2.ListJobsRequest(model="m\x00"), "model")
    metadata = dataset_pb2.DatasetMetadata(display_name="d\x00s")
    parts = [dataset_pb2.UploadDatasetRequest(metadata=metadata),
             dataset_pb2.UploadDatasetRequest(chunk=b'{"clean": "a", "corrupted": "b"}')]
    invalid(api_server, lambda r, **kw: api_server.datasets.UploadDataset(iter(r), **kw), parts,
            "metadata.display_name")


def test_display_names_fit_their_column(api_server: Server) -> None:
    assert MAX_DISPLAY_NAME == MAX_NAME_LENGTH == Dataset.__table__.c.display_name.type.length

    def upload(display_name: str, timeout: float = 30) -> dataset_pb2.Dataset:
        parts = [dataset_pb2.UploadDatasetRequest(
                     metadata=dataset_pb2.DatasetMetadata(display_name=display_name)),
                 dataset_pb2.UploadDatasetRequest(chunk=b'{"clean": "a", "corrupted": "b"}')]
        return api_server.datasets.UploadDataset(iter(parts), timeout=timeout)

    invalid(api_server, upload, "x" * (MAX_DISPLAY_NAME + 1), "metadata.display_name")
    assert upload("é" * MAX_DISPLAY_NAME).display_name == "é" * MAX_DISPLAY_NAME


# ----------------------------------------------------------------------------- seeds


def test_seeds_beyond_the_engines_range(api_server: Server) -> None:
    for seed in (defaults.MAX_SEED + 1, -defaults.MAX_SEED - 1, 2**63 - 1, -(2**63)):
        invalid(api_server, api_server.jobs.SubmitJob, submit_request(seed=seed), "spec.seed")
    for seed in (defaults.MAX_SEED, -defaults.MAX_SEED):
        job = api_server.jobs.SubmitJob(submit_request(seed=seed), timeout=30)
        assert job.state == job_pb2.JOB_STATE_PENDING


def test_the_extreme_seeds_seed_the_engine() -> None:
    """What submit accepts, torch takes: at both ends, far past any run's steps."""
    stride, far = defaults.SEED_STRIDE, 2**40
    for seed in (defaults.MAX_SEED, -defaults.MAX_SEED):
        torch.Generator().manual_seed(seed * stride + far)
        assert sorted(batch_rows(8, 8, seed, step=far // 8).tolist()) == list(range(8))
    with pytest.raises((RuntimeError, ValueError)):
        torch.Generator().manual_seed((defaults.MAX_SEED + 2**30) * stride * 2)


def test_a_job_at_the_largest_seed_succeeds(live_server: Server) -> None:
    spec = edge_pruning_spec(steps=4)
    spec.seed = defaults.MAX_SEED
    job = live_server.jobs.SubmitJob(job_pb2.SubmitJobRequest(spec=spec), timeout=30)
    done = live_server.wait_done(job.name, timeout=300)
    assert done.state == job_pb2.JOB_STATE_SUCCEEDED, done.error.message


# --------------------------------------------------------------------- wire data


def raw_unary(server: Server, method: str) -> grpc.UnaryUnaryMultiCallable:
    """A call that sends bytes as they are, whatever they hold."""
    return server.channel.unary_unary(method, request_serializer=None,
                                      response_deserializer=None)


def with_bad_utf8(message: Any, marker: str) -> bytes:
    """``message``'s bytes with ``marker`` (3 ASCII characters, once in it) replaced by a lone
    surrogate's 3 bytes: what a client that encodes with "surrogatepass" sends."""
    data = message.SerializeToString()
    assert data.count(marker.encode()) == 1
    return data.replace(marker.encode(), "\ud800".encode("utf-8", "surrogatepass"))


def example_marked(marker: str) -> job_pb2.SubmitJobRequest:
    request = submit_request()
    request.spec.data.examples.examples[1].clean = marker
    return request


@pytest.mark.parametrize(("method", "data", "field"), ids=[
    "garbage", "truncated", "bad-wire-type", "name-not-utf8", "nested-not-utf8", "map-not-utf8",
], argvalues=[
    ("/edgeprune.v1.JobService/GetJob", b"\xff\xff\xff\xff", "request"),
    ("/edgeprune.v1.JobService/SubmitJob", b"\x12\x05ab", "request"),  # truncated field
    ("/edgeprune.v1.CircuitService/ListCircuits", b"\x0f", "request"),  # bad wire type
    ("/edgeprune.v1.JobService/GetJob",
     with_bad_utf8(job_pb2.GetJobRequest(name="jobs/@@@"), "@@@"), "name"),
    ("/edgeprune.v1.JobService/SubmitJob", with_bad_utf8(example_marked("@@@"), "@@@"),
     "spec.data.examples.examples[1].clean"),
    ("/edgeprune.v1.JobService/SubmitJob",
     with_bad_utf8(job_pb2.SubmitJobRequest(labels={"team": "@@@"}), "@@@"), "labels"),
])
def test_corrupt_wire_data(api_server: Server, method: str, data: bytes, field: str) -> None:
    invalid(api_server, raw_unary(api_server, method), data, field)


def test_corrupt_message_in_a_client_stream(api_server: Server) -> None:
    upload = api_server.channel.stream_unary("/edgeprune.v1.DatasetService/UploadDataset",
                                             request_serializer=None, response_deserializer=None)
    first = dataset_pb2.UploadDatasetRequest(
        metadata=dataset_pb2.DatasetMetadata(display_name="ds")).SerializeToString()
    for bad, field in ((b"\xff\xff", "request"),
                       (with_bad_utf8(dataset_pb2.UploadDatasetRequest(
                           metadata=dataset_pb2.DatasetMetadata(display_name="@@@")), "@@@"),
                        "metadata.display_name")):
        invalid(api_server, lambda parts, **kw: upload(iter(parts), **kw), [first, bad], field)


def test_no_tracebacks_after_bad_input(api_server: Server) -> None:
    try:
        api_server.jobs.GetJob(job_pb2.GetJobRequest(name="jobs/missing"), timeout=10)
    except grpc.RpcError as err:
        assert details(err)[0] == "NOT_FOUND"
    assert "Traceback" not in api_server.log()
    assert "internal error" not in api_server.log()
