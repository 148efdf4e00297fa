"""The API over a real loopback server (no workers): server info, health, reflection, datasets,
job submission and listing, and every kind of bad input with its status code and field."""

from __future__ import annotations

import json

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from edgeprune.v1 import circuit_pb2, common_pb2, dataset_pb2, job_pb2, server_pb2
from tests.service.errors import fails
from tests.service.harness import MODEL, Server, edge_pruning_spec, inline_examples


def submit(server: Server, spec: job_pb2.JobSpec, **kwargs: object) -> job_pb2.Job:
    return server.jobs.SubmitJob(job_pb2.SubmitJobRequest(spec=spec, **kwargs), timeout=30)


def upload(server: Server, lines: list[object], *, request_id: str = "", chunk: int = 100,
           display_name: str = "ds") -> dataset_pb2.Dataset:
    content = "\n".join(json.dumps(x) for x in lines).encode()
    parts = [dataset_pb2.UploadDatasetRequest(metadata=dataset_pb2.DatasetMetadata(
        display_name=display_name, request_id=request_id, labels={"team": "a"}))]
    parts += [dataset_pb2.UploadDatasetRequest(chunk=content[i:i + chunk])
              for i in range(0, len(content), chunk)]
    return server.datasets.UploadDataset(iter(parts), timeout=30)


EXAMPLE = {"clean": "When Mary and John went", "corrupted": "When Mary and Tom went",
           "target": " Mary", "distractor": " John"}


def test_server_info_lists_the_allow_list_and_limits(api_server: Server) -> None:
    info = api_server.info.GetServerInfo(server_pb2.GetServerInfoRequest(), timeout=60)
    assert [m.name for m in info.models] == [MODEL]
    assert info.models[0].ref.startswith("hf:")
    assert info.limits.max_steps == 1000 and info.limits.max_dataset_bytes == 4096
    assert "ioi" in info.tasks and common_pb2.METHOD_EDGE_PRUNING in info.methods
    assert info.version and info.devices[0].name in ("cpu", "cuda:0")


def test_health_and_reflection(api_server: Server) -> None:
    health = health_pb2_grpc.HealthStub(api_server.channel)
    for service in ("", "edgeprune.v1.JobService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(api_server.channel)
    replies = list(stub.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="edgeprune.v1.JobService"),
    ]), timeout=10))
    services = {s.name for s in replies[0].list_services_response.service}
    assert {"edgeprune.v1.JobService", "edgeprune.v1.CircuitService",
            "edgeprune.v1.DatasetService", "edgeprune.v1.ServerService",
            "grpc.health.v1.Health"} <= services
    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in replies[1].file_descriptor_response.file_descriptor_proto]
    assert "edgeprune/v1/job.proto" in {f.name for f in files}


def test_upload_get_list_delete_dataset(api_server: Server) -> None:
    dataset = upload(api_server, [EXAMPLE] * 5, request_id="upload-1", chunk=7)
    assert dataset.name.startswith("datasets/") and dataset.example_count == 5
    assert len(dataset.content_sha256) == 64 and dataset.labels["team"] == "a"
    again = upload(api_server, [EXAMPLE] * 5, request_id="upload-1")
    assert again.name == dataset.name
    got = api_server.datasets.GetDataset(dataset_pb2.GetDatasetRequest(name=dataset.name))
    assert got == dataset
    names = [d.name for d in api_server.datasets.ListDatasets(
        dataset_pb2.ListDatasetsRequest(page_size=100)).datasets]
    assert dataset.name in names
    # A job can name it; once deleted it is gone.
    spec = edge_pruning_spec(job_pb2.DataSpec(dataset=dataset.name))
    assert submit(api_server, spec).state == job_pb2.JOB_STATE_PENDING
    api_server.datasets.DeleteDataset(dataset_pb2.DeleteDatasetRequest(name=dataset.name))
    assert fails(api_server.datasets.GetDataset,
                 dataset_pb2.GetDatasetRequest(name=dataset.name))[0] == "NOT_FOUND"
    code, reason, _ = fails(submit, api_server, spec)
    assert (code, reason) == ("NOT_FOUND", "DATASET_NOT_FOUND")


@pytest.mark.parametrize(("lines", "code", "field"), [
    (["not json"], "INVALID_ARGUMENT", "chunk line 1"),
    ([[1, 2]], "INVALID_ARGUMENT", "chunk line 1"),
    ([{"clean": "a"}], "INVALID_ARGUMENT", "chunk line 1"),
    ([{**EXAMPLE, "extra": 1}], "INVALID_ARGUMENT", "chunk line 1"),
    ([], "INVALID_ARGUMENT", "chunk"),
    ([EXAMPLE] * 60, "RESOURCE_EXHAUSTED", "chunk"),  # over max_dataset_bytes = 4096
])
def test_bad_uploads(api_server: Server, lines: list[object], code: str, field: str) -> None:
    assert fails(upload, api_server, lines)[::2] == (code, [field])


def test_upload_without_metadata_first(api_server: Server) -> None:
    parts = iter([dataset_pb2.UploadDatasetRequest(chunk=b"{}")])
    assert fails(api_server.datasets.UploadDataset, parts)[::2] == ("INVALID_ARGUMENT",
                                                                    ["metadata"])


def test_submit_is_idempotent_per_request_id(api_server: Server) -> None:
    spec = edge_pruning_spec()
    first = submit(api_server, spec, request_id="same-request", labels={"run": "x"})
    second = submit(api_server, spec, request_id="same-request", labels={"run": "x"})
    assert first.name == second.name and first.state == job_pb2.JOB_STATE_PENDING
    other = edge_pruning_spec(steps=13)
    code, _, _ = fails(submit, api_server, other, request_id="same-request")
    assert code == "ALREADY_EXISTS"
    assert submit(api_server, spec).name != first.name  # no request_id: a new job


def test_defaults_are_filled_into_the_stored_spec(api_server: Server) -> None:
    spec = job_pb2.JobSpec(model=MODEL, method=common_pb2.METHOD_EDGE_PRUNING)
    spec.data.task.name = "ioi"
    job = submit(api_server, spec)
    stored = api_server.jobs.GetJob(job_pb2.GetJobRequest(name=job.name, view=common_pb2.VIEW_FULL))
    assert stored.spec.edge_pruning.steps == 12  # --default-steps
    assert stored.spec.data.task.example_count == 16  # --default-examples
    assert stored.spec.batch_size == 8 and stored.spec.edge_pruning.node_masks
    assert stored.spec.sizes[0].edge_sparsity == pytest.approx(0.95)
    assert stored.spec.ablation == common_pb2.ABLATION_CORRUPTED
    assert stored.type == job_pb2.JOB_TYPE_DISCOVERY and stored.create_time.seconds > 0


def test_basic_view_leaves_out_inline_examples(api_server: Server) -> None:
    job = submit(api_server, edge_pruning_spec())
    basic = api_server.jobs.GetJob(job_pb2.GetJobRequest(name=job.name))
    full = api_server.jobs.GetJob(job_pb2.GetJobRequest(name=job.name, view=common_pb2.VIEW_FULL))
    assert not basic.spec.data.examples.examples
    assert len(full.spec.data.examples.examples) == 12


def test_list_jobs_pages_and_filters(api_server: Server) -> None:
    names = {submit(api_server, edge_pruning_spec(), labels={"batch": "paging"}).name
             for _ in range(5)}
    seen: list[str] = []
    token = ""
    while True:
        page = api_server.jobs.ListJobs(job_pb2.ListJobsRequest(
            page_size=2, page_token=token, labels={"batch": "paging"}, model=MODEL,
            states=[job_pb2.JOB_STATE_PENDING]))
        assert len(page.jobs) <= 2
        seen += [j.name for j in page.jobs]
        token = page.next_page_token
        if not token:
            break
    assert set(seen) == names and len(seen) == len(names)
    assert not api_server.jobs.ListJobs(job_pb2.ListJobsRequest(model="other")).jobs
    code, _, _ = fails(api_server.jobs.ListJobs, job_pb2.ListJobsRequest(page_token="junk"))
    assert code == "INVALID_ARGUMENT"


def test_cancel_pending_job(api_server: Server) -> None:
    job = submit(api_server, edge_pruning_spec())
    cancelled = api_server.jobs.CancelJob(job_pb2.CancelJobRequest(name=job.name))
    assert cancelled.state == job_pb2.JOB_STATE_CANCELLED
    again = api_server.jobs.CancelJob(job_pb2.CancelJobRequest(name=job.name))
    assert again.state == job_pb2.JOB_STATE_CANCELLED
    events = list(api_server.watch(job.name))
    assert [e.state_change.state for e in events] == [job_pb2.JOB_STATE_PENDING,
                                                      job_pb2.JOB_STATE_CANCELLED]
    assert list(api_server.watch(job.name, after=events[-1].sequence)) == []


def _mutate(path: str, value: object) -> job_pb2.SubmitJobRequest:
    """A valid request with one field changed (``path`` like "spec.edge_pruning.steps")."""
    request = job_pb2.SubmitJobRequest(spec=edge_pruning_spec())
    *parents, leaf = path.split(".")
    target = request
    for name in parents:
        target = getattr(target, name)
    if callable(value):  # gets the field itself (a message, repeated field or map)
        value(getattr(target, leaf))
    else:
        setattr(target, leaf, value)
    return request


BAD_FIELDS = [
    ("spec.model", "", "INVALID_ARGUMENT", "spec.model"),
    ("spec.model", "gpt-4", "INVALID_ARGUMENT", "spec.model"),
    ("spec.method", common_pb2.METHOD_UNSPECIFIED, "INVALID_ARGUMENT", "spec.method"),
    ("spec.method", 42, "INVALID_ARGUMENT", "spec.method"),
    ("spec.ablation", 9, "INVALID_ARGUMENT", "spec.ablation"),
    ("spec.loss", 9, "INVALID_ARGUMENT", "spec.loss"),
    ("spec.positions", 9, "INVALID_ARGUMENT", "spec.positions"),
    ("spec.dtype", 9, "INVALID_ARGUMENT", "spec.dtype"),
    ("spec.batch_size", -1, "INVALID_ARGUMENT", "spec.batch_size"),
    ("spec.batch_size", 5000, "RESOURCE_EXHAUSTED", "spec.batch_size"),
    ("spec.edge_pruning.steps", -5, "INVALID_ARGUMENT", "spec.edge_pruning.steps"),
    ("spec.edge_pruning.steps", 1001, "RESOURCE_EXHAUSTED", "spec.edge_pruning.steps"),
    ("spec.edge_pruning.warmup_steps", 50, "INVALID_ARGUMENT", "spec.edge_pruning.warmup_steps"),
    ("spec.edge_pruning.mask_learning_rate", -0.1, "INVALID_ARGUMENT",
     "spec.edge_pruning.mask_learning_rate"),
    ("spec.edge_pruning.lambda_learning_rate", float("nan"), "INVALID_ARGUMENT",
     "spec.edge_pruning.lambda_learning_rate"),
    ("spec.edge_pruning.node_sparsity", 3.0, "INVALID_ARGUMENT",
     "spec.edge_pruning.node_sparsity"),
    ("spec.edge_pruning.warm_start", 7, "INVALID_ARGUMENT", "spec.edge_pruning.warm_start"),
    ("spec.sizes", lambda sizes: sizes.add(), "INVALID_ARGUMENT", "spec.sizes[1]"),
    ("spec.sizes", lambda sizes: sizes[0].__setattr__("edge_sparsity", 1.5),
     "INVALID_ARGUMENT", "spec.sizes[0].edge_sparsity"),
    ("spec.sizes", lambda sizes: sizes.add(edge_count=0), "INVALID_ARGUMENT",
     "spec.sizes[1].edge_count"),
    ("spec.sizes", lambda sizes: sizes.add(edge_fraction=0.0), "INVALID_ARGUMENT",
     "spec.sizes[1].edge_fraction"),
    ("spec.sizes", lambda sizes: [sizes.add(edge_sparsity=0.5) for _ in range(5)],
     "RESOURCE_EXHAUSTED", "spec.sizes"),
    ("spec", lambda spec: spec.ClearField("data"), "INVALID_ARGUMENT", "spec.data"),
    ("spec.data", lambda data: data.ClearField("examples"), "INVALID_ARGUMENT",
     "spec.data.source"),
    ("spec.data.eval_fraction", 0.95, "INVALID_ARGUMENT", "spec.data.eval_fraction"),
    ("spec.data.dataset", "nope", "INVALID_ARGUMENT", "spec.data.dataset"),
    ("spec.data", lambda data: data.task.__setattr__("name", "sorting"), "INVALID_ARGUMENT",
     "spec.data.task.name"),
    ("spec.data", lambda data: data.task.__setattr__("name", ""), "INVALID_ARGUMENT",
     "spec.data.task.name"),
    ("spec.data", lambda data: data.task.__setattr__("name", "tracr_reverse"),
     "INVALID_ARGUMENT", "spec.data.task.name"),
    ("spec.data", lambda data: (data.task.__setattr__("name", "ioi"),
                                data.task.__setattr__("example_count", 10**6)),
     "RESOURCE_EXHAUSTED", "spec.data.task.example_count"),
    ("spec.data", lambda data: data.examples.examples[3].__setattr__("corrupted", ""),
     "INVALID_ARGUMENT", "spec.data.examples.examples[3].corrupted"),
    ("spec.data", lambda data: data.examples.examples.extend(inline_examples(40).examples.examples),
     "RESOURCE_EXHAUSTED", "spec.data.examples.examples"),
    ("spec.data", lambda data: data.examples.examples.add(clean="x" * 5000, corrupted="y"),
     "INVALID_ARGUMENT", "spec.data.examples.examples[12].clean"),
    ("spec.method", common_pb2.METHOD_EAP, "INVALID_ARGUMENT", "spec.edge_pruning"),
    ("spec", lambda spec: (spec.__setattr__("method", common_pb2.METHOD_EDGE_PRUNING),
                           spec.attribution.__setattr__("ig_steps", 3)),
     "INVALID_ARGUMENT", "spec.attribution"),
    ("priority", 1000, "INVALID_ARGUMENT", "priority"),
    ("labels", lambda labels: labels.__setitem__("Bad Key", "v"), "INVALID_ARGUMENT",
     "labels['Bad Key']"),
    ("labels", lambda labels: labels.__setitem__("k", "v" * 100), "INVALID_ARGUMENT",
     "labels['k']"),
    ("request_id", "r" * 200, "INVALID_ARGUMENT", "request_id"),
]


@pytest.mark.parametrize(("path", "value", "code", "field"), BAD_FIELDS,
                         ids=[f"{p}-{f}-{i}" for i, (p, _, _, f) in enumerate(BAD_FIELDS)])
def test_every_bad_submit_field_has_its_code_and_field(
    api_server: Server, path: str, value: object, code: str, field: str,
) -> None:
    request = _mutate(path, value)
    got_code, reason, fields = fails(api_server.jobs.SubmitJob, request, timeout=30)
    assert (got_code, fields[:1]) == (code, [field]), fields
    assert reason


def test_missing_spec(api_server: Server) -> None:
    assert fails(api_server.jobs.SubmitJob, job_pb2.SubmitJobRequest())[::2] == (
        "INVALID_ARGUMENT", ["spec"])


def test_several_bad_fields_are_all_reported(api_server: Server) -> None:
    request = job_pb2.SubmitJobRequest(spec=job_pb2.JobSpec(batch_size=-1), priority=500)
    code, _, fields = fails(api_server.jobs.SubmitJob, request)
    assert code == "INVALID_ARGUMENT"
    assert {"spec.model", "spec.method", "spec.data", "spec.batch_size", "priority"} <= set(fields)


@pytest.mark.parametrize(("call", "request_", "code", "field"), [
    ("jobs.GetJob", job_pb2.GetJobRequest(name="jobs/missing"), "NOT_FOUND", None),
    ("jobs.GetJob", job_pb2.GetJobRequest(name="job/x"), "INVALID_ARGUMENT", "name"),
    ("jobs.GetJob", job_pb2.GetJobRequest(name=""), "INVALID_ARGUMENT", "name"),
    ("jobs.GetJob", job_pb2.GetJobRequest(name="jobs/../etc"), "INVALID_ARGUMENT", "name"),
    ("jobs.CancelJob", job_pb2.CancelJobRequest(name="jobs/missing"), "NOT_FOUND", None),
    ("jobs.ListJobs", job_pb2.ListJobsRequest(page_size=-1), "INVALID_ARGUMENT", "page_size"),
    ("jobs.ListJobs", job_pb2.ListJobsRequest(states=[42]), "INVALID_ARGUMENT", "states[0]"),
    ("jobs.ListJobs", job_pb2.ListJobsRequest(view=9), "INVALID_ARGUMENT", "view"),
    ("circuits.GetCircuit", circuit_pb2.GetCircuitRequest(name="circuits/missing"),
     "NOT_FOUND", None),
    ("circuits.ListCircuits", circuit_pb2.ListCircuitsRequest(min_edge_count=5, max_edge_count=2),
     "INVALID_ARGUMENT", "max_edge_count"),
    ("circuits.ListCircuits", circuit_pb2.ListCircuitsRequest(dataset="x"), "INVALID_ARGUMENT",
     "dataset"),
    ("circuits.CompareCircuits", circuit_pb2.CompareCircuitsRequest(first="circuits/a",
                                                                    second="circuits/b"),
     "NOT_FOUND", None),
    ("circuits.CompareCircuits", circuit_pb2.CompareCircuitsRequest(first="a"),
     "INVALID_ARGUMENT", "first"),
    ("circuits.EvaluateCircuit", circuit_pb2.EvaluateCircuitRequest(),
     "INVALID_ARGUMENT", "evaluation"),
    ("circuits.EvaluateCircuit", circuit_pb2.EvaluateCircuitRequest(
        evaluation=job_pb2.EvaluationSpec(circuit="circuits/missing", data=inline_examples())),
     "NOT_FOUND", None),
    ("datasets.GetDataset", dataset_pb2.GetDatasetRequest(name="datasets/missing"),
     "NOT_FOUND", None),
    ("datasets.DeleteDataset", dataset_pb2.DeleteDatasetRequest(name="datasets/missing"),
     "NOT_FOUND", None),
])
def test_names_and_lookups(api_server: Server, call: str, request_: object, code: str,
                           field: str | None) -> None:
    stub_name, method = call.split(".")
    got_code, reason, fields = fails(getattr(getattr(api_server, stub_name), method), request_)
    assert got_code == code and reason
    assert fields[:1] == ([field] if field else [])


def test_export_circuit_needs_a_format_and_a_circuit(api_server: Server) -> None:
    request = circuit_pb2.ExportCircuitRequest(name="circuits/missing",
                                               format=circuit_pb2.EXPORT_FORMAT_JSON)
    assert fails(lambda: list(api_server.circuits.ExportCircuit(request)))[0] == "NOT_FOUND"
    request.format = circuit_pb2.EXPORT_FORMAT_UNSPECIFIED
    assert fails(lambda: list(api_server.circuits.ExportCircuit(request)))[::2] == (
        "INVALID_ARGUMENT", ["format"])


def test_watch_unknown_job(api_server: Server) -> None:
    assert fails(lambda: list(api_server.watch("jobs/missing")))[0] == "NOT_FOUND"
    job = submit(api_server, edge_pruning_spec())
    assert fails(lambda: list(api_server.watch(job.name, after=-1)))[::2] == (
        "INVALID_ARGUMENT", ["after_sequence"])


def test_oversized_message_is_rejected(api_server: Server) -> None:
    spec = edge_pruning_spec()
    spec.data.examples.examples[0].clean = "x" * (17 * 1024 * 1024)
    with pytest.raises(grpc.RpcError) as err:
        api_server.jobs.SubmitJob(job_pb2.SubmitJobRequest(spec=spec), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
