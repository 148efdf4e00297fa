"""The blocking client against a real loopback server with a worker, SQLite and a tiny model:
every method, idempotent submits, paging, typed errors, retries and watch resumption."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path

import grpc
import pytest

from edgeprune.client import (
    Client,
    EdgepruneError,
    InvalidArgument,
    JobCancelled,
    NotFound,
    PermissionDenied,
    RetryPolicy,
    Unauthenticated,
    Unavailable,
)
from edgeprune.client._retry import Deadline
from edgeprune.v1 import common_pb2, job_pb2
from tests.client.conftest import TINY_MODEL, ClientServer, tiny_job


def _events(client: Client, name: str) -> list[job_pb2.JobEvent]:
    return list(client.watch(name))


def test_server_info(client: Client) -> None:
    info = client.server_info()
    assert info.version
    assert TINY_MODEL in [m.name for m in info.models]
    assert "ioi" in info.tasks
    assert common_pb2.METHOD_EDGE_PRUNING in info.methods


def test_submit_watch_wait_and_query_the_circuit(client: Client, tmp_path: Path) -> None:
    job = client.submit(labels={"test": "client"}, **tiny_job())
    assert job.name.startswith("jobs/") and job.state == job_pb2.JOB_STATE_PENDING
    events = _events(client, job.name)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert any(e.WhichOneof("event") == "progress" for e in events)
    last = events[-1].state_change
    assert last.state == job_pb2.JOB_STATE_SUCCEEDED

    done = client.wait(job.name)
    assert done.state == job_pb2.JOB_STATE_SUCCEEDED
    assert list(done.result.circuits) == list(last.result.circuits)
    assert client.get_job(job.name.split("/", 1)[1]).name == job.name  # a bare id works too
    assert job.name in [j.name for j in client.list_jobs(labels={"test": "client"})]

    circuit = client.get_circuit(done.result.circuits[0], full=True)
    assert circuit.job == job.name and circuit.model == TINY_MODEL
    assert circuit.edge_count == len(circuit.edges) > 0
    assert {"kl", "faithfulness"} <= set(circuit.metrics)
    assert circuit.name in [c.name for c in client.list_circuits(job=job.name)]
    some_edge = circuit.edges[0].name
    assert circuit.name in [c.name for c in client.list_circuits(model=TINY_MODEL, contains_edge=some_edge)]

    exported = client.export_circuit(circuit.name, tmp_path / "c.json", format="json")
    assert some_edge in json.loads(exported.read_text())["edges"] or some_edge in exported.read_text()
    svg = client.export_circuit(circuit.name, tmp_path / "c.svg", format="svg").read_text()
    assert "<svg" in svg
    dot = client.export_circuit(circuit.name, tmp_path, format="dot")
    assert dot.parent == tmp_path and "digraph" in dot.read_text()

    same = client.compare_circuits(circuit.name, circuit.name)
    assert same.edge_jaccard == 1.0 and len(same.shared_edges) == circuit.edge_count


def test_evaluate_and_compare_two_methods(client: Client, finished_circuit: str) -> None:
    base = client.get_circuit(finished_circuit)
    eap_spec = tiny_job(method="eap", sparsity=None, steps=None, edges=base.edge_count)
    eap_job = client.wait(client.submit(**eap_spec).name)
    eap = client.get_circuit(eap_job.result.circuits[0])
    assert eap.method == common_pb2.METHOD_EAP and eap.edge_count <= base.edge_count
    diff = client.compare_circuits(base.name, eap.name)
    union = len(diff.shared_edges) + len(diff.first_only_edges) + len(diff.second_only_edges)
    assert diff.edge_jaccard == pytest.approx(len(diff.shared_edges) / union)

    evaluation = client.wait(client.evaluate_circuit(base.name, task="ioi", task_examples=8).name)
    assert evaluation.type == job_pb2.JOB_TYPE_EVALUATION and "kl" in evaluation.result.metrics


def test_submit_is_idempotent_by_request_id(client: Client) -> None:
    first = client.submit(request_id="client-test-idem", **tiny_job(steps=2))
    again = client.submit(request_id="client-test-idem", **tiny_job(steps=2))
    assert again.name == first.name
    client.cancel(first.name)


def test_list_jobs_walks_every_page(client: Client) -> None:
    jobs = [client.submit(priority=-50, labels={"paging": "yes"}, **tiny_job(steps=10_000)) for _ in range(3)]
    names = {job.name for job in jobs}
    listed = [j.name for j in client.list_jobs(labels={"paging": "yes"}, page_size=1)]
    assert sorted(listed) == sorted(names)  # each once, across three pages
    for name in names:
        client.cancel(name)
    for name in names:  # a job a worker already runs stops at its next step
        with contextlib.suppress(JobCancelled):
            client.wait(name)
    states = {j.name: j.state for j in client.list_jobs(labels={"paging": "yes"})}
    cancelled = {j.name for j in client.list_jobs(states=["cancelled"], labels={"paging": "yes"})}
    assert cancelled == {n for n, state in states.items() if state == job_pb2.JOB_STATE_CANCELLED}
    assert cancelled  # the worker cannot have finished all three before the cancels


def test_cancel_and_wait_raises_job_cancelled(client: Client) -> None:
    # long enough that the cancel lands before an idle worker could finish it
    job = client.submit(priority=-100, **tiny_job(steps=10_000))
    cancelled = client.cancel(job.name)
    assert cancelled.cancel_requested or cancelled.state == job_pb2.JOB_STATE_CANCELLED
    with pytest.raises(JobCancelled) as caught:
        client.wait(job.name)
    assert caught.value.job.state == job_pb2.JOB_STATE_CANCELLED and caught.value.exit_code == 11


def test_datasets_upload_list_get_delete(client: Client, tmp_path: Path) -> None:
    rows = [
        {"clean": "When Mary and John went to the store, John gave a drink to",
         "corrupted": "When Mary and John went to the store, Tom gave a drink to",
         "target": " Mary", "distractor": " John"},
    ] * 4
    path = tmp_path / "ioi.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from_file = client.upload_dataset(path, labels={"k": "v"})
    from_rows = client.upload_dataset(rows, display_name="rows")
    assert from_file.example_count == from_rows.example_count == 4
    assert from_file.display_name == "ioi" and dict(from_file.labels) == {"k": "v"}
    assert from_file.content_sha256 and client.get_dataset(from_file.name) == from_file
    assert {from_file.name, from_rows.name} <= {d.name for d in client.list_datasets(page_size=1)}

    job = client.wait(client.submit(**tiny_job(task=None, dataset=from_rows.name)).name)
    assert client.get_circuit(job.result.circuits[0]).dataset == from_rows.name

    client.delete_dataset(from_file.name)
    with pytest.raises(NotFound):
        client.get_dataset(from_file.name)


def test_typed_errors_carry_reason_and_field(client: Client) -> None:
    with pytest.raises(InvalidArgument) as caught:
        client.submit(**tiny_job(model="not-on-the-list"))
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.field == "spec.model"
    assert error.reason and "allow-list" in str(error) and error.exit_code == 3

    with pytest.raises(InvalidArgument) as caught:
        client.submit(**tiny_job(steps=-5))
    assert caught.value.field == "spec.edge_pruning.steps"
    assert caught.value.violations[0].field == "spec.edge_pruning.steps"

    with pytest.raises(NotFound) as caught:
        client.get_job("jobs/does-not-exist")
    assert caught.value.reason and caught.value.exit_code == 4
    with pytest.raises(NotFound):
        client.get_circuit("nope")
    with pytest.raises(NotFound):
        list(client.watch("jobs/does-not-exist"))
    with pytest.raises(NotFound):
        client.compare_circuits("nope", "nope2")

    with pytest.raises(InvalidArgument) as caught:  # refused before sending
        client.submit(model=TINY_MODEL, task="ioi", method="gradient-magic")
    assert caught.value.field == "method" and caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(InvalidArgument):
        client.upload_dataset(Path("/does/not/exist.jsonl"))
    with pytest.raises(InvalidArgument):
        client.export_circuit("c", "out.bin", format="gif")


def test_bearer_token(client_server: ClientServer) -> None:
    with client_server.extra_api(auth_tokens=("s3cret",), insecure=True) as target:
        with Client(target, token="s3cret") as good:
            assert good.server_info().version
        with Client(target) as anonymous, pytest.raises(Unauthenticated) as caught:
            anonymous.server_info()
        assert caught.value.exit_code == 8
        with Client(target, token="wrong") as wrong, pytest.raises(Unauthenticated):
            list(wrong.list_jobs())
        # A known principal asking for more than it may: PermissionDenied, still Unauthenticated.
        with Client(target, token="s3cret") as good, pytest.raises(PermissionDenied) as denied:
            good.submit(model=TINY_MODEL, task="ioi", method="eap", priority=5)
        assert isinstance(denied.value, Unauthenticated) and denied.value.field == "priority"
        assert denied.value.reason == "PRIORITY_NOT_ALLOWED"


def test_retry_policy_decisions() -> None:
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.1, max_backoff=0.15)
    forever = Deadline(None)
    assert 0 <= policy.delay(grpc.StatusCode.UNAVAILABLE, 0, forever) <= 0.1
    assert 0 <= policy.delay(grpc.StatusCode.UNAVAILABLE, 1, forever) <= 0.15
    assert policy.delay(grpc.StatusCode.UNAVAILABLE, 2, forever) is None  # attempts used up
    for code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL):
        assert policy.delay(code, 0, forever) is None
    assert policy.delay(grpc.StatusCode.UNAVAILABLE, 0, Deadline(0.0)) is None  # past the deadline


def test_unavailable_is_retried_until_the_server_comes_up(client_server: ClientServer) -> None:
    """A unary call made while nothing listens succeeds once a server starts on that port."""
    port = client_server.free_port()
    patient = RetryPolicy(max_attempts=40, initial_backoff=0.05, max_backoff=0.5)
    result: dict[str, object] = {}

    def call() -> None:
        with Client(f"127.0.0.1:{port}", retry=patient, timeout=30) as late:
            try:
                result["info"] = late.server_info()
            except EdgepruneError as error:  # reported below
                result["error"] = error

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(0.5)  # let the first attempts fail with UNAVAILABLE
    with client_server.extra_api(port):
        thread.join(30)
    assert "error" not in result, result.get("error")
    assert result["info"].version  # type: ignore[attr-defined]

    once = RetryPolicy(max_attempts=2, initial_backoff=0.01)
    with Client(f"127.0.0.1:{port}", retry=once, timeout=5) as gone, pytest.raises(Unavailable) as caught:
        gone.server_info()
    assert caught.value.exit_code == 9


def test_watch_resumes_across_a_server_restart(client_server: ClientServer) -> None:
    """Cut every open stream by restarting the API mid-job: the watch reconnects, resumes after
    the last sequence number it yielded, and sees each event exactly once."""
    retry = RetryPolicy(max_attempts=60, initial_backoff=0.05, max_backoff=0.5)
    with Client(client_server.target, retry=retry) as client:
        job = client.submit(**tiny_job(steps=50))
        seen: list[int] = []
        cut_at: job_pb2.Job | None = None
        for event in client.watch(job.name):
            seen.append(event.sequence)
            if cut_at is None and len(seen) >= 3 and event.WhichOneof("event") == "progress":
                cut_at = client.get_job(job.name)
                client_server.restart_api()
        assert cut_at is not None and cut_at.state == job_pb2.JOB_STATE_RUNNING
        assert seen[-1] > cut_at.last_event_sequence  # events came after the reconnect
        assert seen == list(range(1, len(seen) + 1))  # nothing lost, nothing repeated
        assert seen == [e.sequence for e in client.watch(job.name)]  # a full replay agrees
        assert client.wait(job.name).state == job_pb2.JOB_STATE_SUCCEEDED
        assert client_server.restarts >= 1


def test_watch_from_a_sequence_number_and_after_the_end(client: Client, finished_job: str) -> None:
    every = _events(client, finished_job)
    later = list(client.watch(finished_job, after_sequence=2))
    assert [e.sequence for e in later] == [e.sequence for e in every[2:]]
    assert list(client.watch(finished_job, after_sequence=every[-1].sequence)) == []
