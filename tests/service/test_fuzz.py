"""Random SubmitJob requests (hypothesis) never crash the server or leave a bad job behind:
every call either creates a PENDING job whose stored spec passes validation again, or fails with
a client-error code carrying a reason; the server stays healthy throughout."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeprune.service.config import Config, Limits
from edgeprune.service.errors import ServiceError
from edgeprune.service.validation import Violations, normalize_job_spec
from edgeprune.v1 import common_pb2, job_pb2
from tests.service.errors import details
from tests.service.harness import MODEL, Server

CLIENT_ERRORS = {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "NOT_FOUND", "ALREADY_EXISTS",
                 "FAILED_PRECONDITION"}

ints = st.one_of(st.integers(-5, 50), st.integers(-(2**31), 2**31 - 1))
floats = st.one_of(st.floats(-2, 3), st.floats(allow_nan=True, allow_infinity=True))
texts = st.one_of(st.text(max_size=12), st.sampled_from(["", MODEL, "ioi", "datasets/x",
                                                         "datasets/", "tracr_reverse"]))
enum_values = st.one_of(st.integers(0, 4), st.integers(-3, 2**31 - 1))


@st.composite
def examples(draw: st.DrawFn) -> job_pb2.InlineExamples:
    out = job_pb2.InlineExamples(all_positions=draw(st.booleans()))
    for _ in range(draw(st.integers(0, 4))):
        out.examples.add(clean=draw(texts), corrupted=draw(texts), target=draw(texts))
    return out


@st.composite
def requests(draw: st.DrawFn) -> job_pb2.SubmitJobRequest:
    spec = job_pb2.JobSpec(model=draw(st.sampled_from([MODEL, "", "other", MODEL])),
                           method=draw(enum_values), batch_size=draw(ints),
                           seed=draw(st.integers(-(2**63), 2**63 - 1)), ablation=draw(enum_values),
                           loss=draw(enum_values), positions=draw(enum_values),
                           dtype=draw(enum_values))
    source = draw(st.sampled_from(["task", "examples", "dataset", "none"]))
    if source == "task":
        spec.data.task.name = draw(texts)
        spec.data.task.example_count = draw(ints)
        spec.data.task.params.update(draw(st.dictionaries(st.text(max_size=5),
                                                          st.text(max_size=5), max_size=2)))
    elif source == "examples":
        spec.data.examples.CopyFrom(draw(examples()))
    elif source == "dataset":
        spec.data.dataset = draw(texts)
    spec.data.eval_fraction = draw(floats)
    for _ in range(draw(st.integers(0, 3))):
        size = spec.sizes.add()
        kind = draw(st.sampled_from(["edge_sparsity", "edge_count", "edge_fraction", "none"]))
        if kind == "edge_count":
            size.edge_count = draw(ints)
        elif kind != "none":
            setattr(size, kind, draw(floats))
    if draw(st.booleans()):
        ep = spec.edge_pruning
        ep.steps, ep.warmup_steps = draw(ints), draw(ints)
        ep.mask_learning_rate, ep.lambda_learning_rate = draw(floats), draw(floats)
        if draw(st.booleans()):
            ep.node_sparsity = draw(floats)
        ep.warm_start = draw(enum_values)
    if draw(st.booleans()):
        spec.attribution.ig_steps = draw(ints)
        spec.attribution.acdc_threshold = draw(floats)
    request = job_pb2.SubmitJobRequest(priority=draw(ints),
                                       request_id=draw(st.one_of(st.just(""), st.text(max_size=8))))
    request.labels.update(draw(st.dictionaries(st.text(max_size=6), st.text(max_size=6),
                                               max_size=2)))
    if draw(st.integers(0, 9)):
        request.spec.CopyFrom(spec)
    return request


def _revalidate(stored: job_pb2.JobSpec, server_limits: Limits) -> None:
    """The stored spec is complete: validating it again changes nothing and finds nothing."""
    again = job_pb2.JobSpec()
    again.CopyFrom(stored)
    v = Violations()
    normalize_job_spec(again, Config(models={MODEL: "hf:x"}, limits=server_limits,
                                     default_steps=12, default_examples=16,
                                     default_batch_size=8), v)
    try:
        v.raise_if_any()
    except ServiceError as err:
        raise AssertionError(f"stored spec fails validation: {err.message}") from err
    assert again == stored


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(request=requests())
def test_random_submit_job_requests(api_server: Server, request: job_pb2.SubmitJobRequest) -> None:
    try:
        job = api_server.jobs.SubmitJob(request, timeout=30)
    except grpc.RpcError as err:
        code, reason, _ = details(err)
        assert code in CLIENT_ERRORS and reason, (code, err.details())
        return
    stored = api_server.jobs.GetJob(job_pb2.GetJobRequest(name=job.name,
                                                          view=common_pb2.VIEW_FULL))
    assert stored.state == job_pb2.JOB_STATE_PENDING and stored.type == job_pb2.JOB_TYPE_DISCOVERY
    limits = Limits(max_dataset_bytes=4096, max_steps=1000, max_inline_examples=50, max_sizes=4)
    _revalidate(stored.spec, limits)


def test_server_is_healthy_after_fuzzing(api_server: Server) -> None:
    health = health_pb2_grpc.HealthStub(api_server.channel)
    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert "Traceback" not in api_server.log()
