"""Jobs end to end over a real server with a worker, on SQLite and PostgreSQL: submit, watch,
fetch and export circuits, sweeps on built-in IOI, cancellation, watch reconnection, metrics."""

from __future__ import annotations

import json
import subprocess
import threading

import grpc
import pytest
from safetensors.numpy import load as load_safetensors

from edgeprune.v1 import circuit_pb2, common_pb2, job_pb2
from tests.service.harness import MODEL, Server, edge_pruning_spec, inline_examples, wait_for


def submit(server: Server, spec: job_pb2.JobSpec, **kwargs: object) -> job_pb2.Job:
    return server.jobs.SubmitJob(job_pb2.SubmitJobRequest(spec=spec, **kwargs), timeout=30)


def export(server: Server, name: str, fmt: int) -> tuple[str, str, bytes]:
    chunks = list(server.circuits.ExportCircuit(
        circuit_pb2.ExportCircuitRequest(name=name, format=fmt), timeout=60))
    return chunks[0].content_type, chunks[0].filename, b"".join(c.data for c in chunks)


def check_event_log(events: list[job_pb2.JobEvent], final: int) -> None:
    """Dense sequence numbers, PENDING -> RUNNING -> ... -> final, progress in between."""
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    states = [e.state_change.state for e in events if e.HasField("state_change")]
    assert states[0] == job_pb2.JOB_STATE_PENDING and states[-1] == final
    assert job_pb2.JOB_STATE_RUNNING in states
    assert events[-1].HasField("state_change")


def test_job_end_to_end(live_server: Server) -> None:
    spec = edge_pruning_spec(steps=10)
    job = submit(live_server, spec, request_id="e2e-1", labels={"suite": "e2e"})
    assert submit(live_server, spec, request_id="e2e-1", labels={"suite": "e2e"}).name == job.name
    events = list(live_server.watch(job.name))
    check_event_log(events, job_pb2.JOB_STATE_SUCCEEDED)
    steps = [e.progress.step for e in events if e.progress.phase == "prune"]
    assert steps == sorted(steps) and steps[-1] == 10
    last = [e.progress for e in events if e.progress.phase == "prune"][-1]
    assert last.total_steps == 10 and last.steps_per_second > 0 and len(last.lambdas) >= 2
    assert 0 <= last.expected_edge_sparsity <= 1
    result = events[-1].state_change.result
    assert len(result.circuits) == 1 and "kl" in result.metrics

    got = live_server.jobs.GetJob(job_pb2.GetJobRequest(name=job.name))
    assert got.state == job_pb2.JOB_STATE_SUCCEEDED and got.result == result
    assert got.attempt == 1 and got.end_time.seconds >= got.start_time.seconds > 0
    assert got.last_event_sequence == events[-1].sequence

    name = result.circuits[0]
    circuit = live_server.circuits.GetCircuit(
        circuit_pb2.GetCircuitRequest(name=name, view=common_pb2.VIEW_FULL))
    assert circuit.job == job.name and circuit.model == MODEL
    assert circuit.method == common_pb2.METHOD_EDGE_PRUNING and circuit.task == "custom"
    assert circuit.edge_count == len(circuit.edges) > 0 and circuit.node_count == len(circuit.nodes)
    assert circuit.total_edge_count > circuit.edge_count
    assert circuit.target.edge_sparsity == pytest.approx(0.9)
    assert "faithfulness" in circuit.metrics
    basic = live_server.circuits.GetCircuit(circuit_pb2.GetCircuitRequest(name=name))
    assert not basic.edges and basic.edge_count == circuit.edge_count

    kind, filename, body = export(live_server, name, circuit_pb2.EXPORT_FORMAT_JSON)
    assert kind == "application/json" and filename.endswith(".json")
    assert set(json.loads(body)["edges"]) == {e.name for e in circuit.edges}
    _, _, dot = export(live_server, name, circuit_pb2.EXPORT_FORMAT_DOT)
    assert dot.lstrip().startswith(b"digraph")
    _, _, svg = export(live_server, name, circuit_pb2.EXPORT_FORMAT_SVG)
    assert b"<svg" in svg
    _, _, raw = export(live_server, name, circuit_pb2.EXPORT_FORMAT_SAFETENSORS)
    masks = load_safetensors(raw)
    assert masks["edge_mask"].shape == (circuit.total_edge_count,)
    assert int(masks["edge_mask"].sum()) == circuit.edge_count

    edge = circuit.edges[0].name
    listed = live_server.circuits.ListCircuits(circuit_pb2.ListCircuitsRequest(
        job=job.name, model=MODEL, contains_edge=edge, method=common_pb2.METHOD_EDGE_PRUNING))
    assert [c.name for c in listed.circuits] == [name]
    none = live_server.circuits.ListCircuits(circuit_pb2.ListCircuitsRequest(
        job=job.name, max_edge_count=max(1, circuit.edge_count - 1)))
    assert not none.circuits
    same = live_server.circuits.CompareCircuits(
        circuit_pb2.CompareCircuitsRequest(first=name, second=name))
    assert same.edge_jaccard == 1.0 and len(same.shared_edges) == circuit.edge_count

    evaluation = live_server.circuits.EvaluateCircuit(circuit_pb2.EvaluateCircuitRequest(
        evaluation=job_pb2.EvaluationSpec(circuit=name, data=spec.data), request_id="eval-1"))
    assert evaluation.type == job_pb2.JOB_TYPE_EVALUATION
    done = live_server.wait_done(evaluation.name)
    assert done.state == job_pb2.JOB_STATE_SUCCEEDED, done.error
    assert list(done.result.circuits) == [name] and "kl" in done.result.metrics


def test_builtin_ioi_sweep(live_server: Server) -> None:
    spec = job_pb2.JobSpec(model=MODEL, method=common_pb2.METHOD_EDGE_PRUNING, batch_size=8)
    spec.data.task.name = "ioi"
    spec.data.task.example_count = 16
    spec.edge_pruning.steps = 6
    spec.sizes.add(edge_sparsity=0.5)
    spec.sizes.add(edge_count=10)
    job = submit(live_server, spec)
    events = list(live_server.watch(job.name))
    check_event_log(events, job_pb2.JOB_STATE_SUCCEEDED)
    # one warm start and one run for the whole sweep
    steps = [e.progress.step for e in events if e.progress.phase == "prune"]
    assert steps == sorted(set(steps)) and steps[-1] == 6
    warm = [e.progress for e in events if e.progress.phase == "warm_start"]
    assert warm and warm[-1].step == warm[-1].total_steps
    assert len({p.total_steps for p in warm}) == 1
    result = events[-1].state_change.result
    assert len(result.circuits) == 2 and {"cpr", "cmd"} <= set(result.metrics)
    circuits = [live_server.circuits.GetCircuit(circuit_pb2.GetCircuitRequest(name=n))
                for n in result.circuits]
    assert [c.task for c in circuits] == ["ioi", "ioi"]
    assert circuits[1].target.edge_count == 10 and circuits[1].edge_count <= 10
    compared = live_server.circuits.CompareCircuits(
        circuit_pb2.CompareCircuitsRequest(first=result.circuits[0], second=result.circuits[1]))
    assert 0 <= compared.edge_jaccard <= 1
    assert len(compared.shared_edges) + len(compared.second_only_edges) == circuits[1].edge_count
    # both sizes are cut from one run's masks: the smaller circuit lies inside the larger
    assert list(compared.second_only_edges) == []


def test_eap_job(live_server: Server) -> None:
    spec = job_pb2.JobSpec(model=MODEL, method=common_pb2.METHOD_EAP_IG, batch_size=8)
    spec.data.task.name = "ioi"
    spec.data.task.example_count = 8
    spec.attribution.ig_steps = 2
    spec.sizes.add(edge_fraction=0.25)
    job = live_server.wait_done(submit(live_server, spec).name)
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job.error
    circuit = live_server.circuits.GetCircuit(
        circuit_pb2.GetCircuitRequest(name=job.result.circuits[0]))
    assert circuit.method == common_pb2.METHOD_EAP_IG and circuit.edge_count > 0


def _first_prune_event(server: Server, name: str) -> job_pb2.JobEvent:
    for event in server.watch(name):
        if event.progress.phase == "prune":
            return event
    raise AssertionError("the job ended before pruning")


def test_cancel_running_job(live_server: Server) -> None:
    job = submit(live_server, edge_pruning_spec(steps=1000))
    _first_prune_event(live_server, job.name)
    cancelled = live_server.jobs.CancelJob(job_pb2.CancelJobRequest(name=job.name))
    assert cancelled.cancel_requested or cancelled.state == job_pb2.JOB_STATE_CANCELLED
    events = list(live_server.watch(job.name))
    check_event_log(events, job_pb2.JOB_STATE_CANCELLED)
    last_step = max(e.progress.step for e in events if e.progress.phase == "prune")
    assert last_step < 1000
    assert not live_server.circuits.ListCircuits(
        circuit_pb2.ListCircuitsRequest(job=job.name)).circuits


def test_cancel_during_the_warm_start(live_server: Server) -> None:
    """The EAP-IG warm start reports its own progress and honours a cancel between passes."""
    spec = edge_pruning_spec(steps=5)
    spec.edge_pruning.warm_start_ig_steps = 1000  # far more passes than the test waits for
    job = submit(live_server, spec)
    for event in live_server.watch(job.name):
        if event.progress.phase == "warm_start" and event.progress.step >= 1:
            break
    else:
        raise AssertionError("the job ended before its warm start")
    assert event.progress.total_steps == 1000 * 3  # integration points x batches of 4
    live_server.jobs.CancelJob(job_pb2.CancelJobRequest(name=job.name))
    done = live_server.wait_done(job.name, timeout=20)  # within seconds, not 3000 passes
    assert done.state == job_pb2.JOB_STATE_CANCELLED
    events = list(live_server.watch(job.name))
    check_event_log(events, job_pb2.JOB_STATE_CANCELLED)
    warm = [e.progress.step for e in events if e.progress.phase == "warm_start"]
    assert max(warm) < 1000 and not any(e.progress.phase == "prune" for e in events)


def test_a_second_job_on_the_same_data_reuses_the_warm_start(live_server: Server) -> None:
    """The worker keeps EAP-IG warm-start scores by model, data and settings: a job at another
    size on the same examples starts pruning without recomputing them."""
    data = inline_examples(10)
    first = live_server.wait_done(submit(live_server, edge_pruning_spec(data, steps=3)).name)
    second = submit(live_server, edge_pruning_spec(data, steps=3, sizes=(0.8,)))
    events = list(live_server.watch(second.name))
    check_event_log(events, job_pb2.JOB_STATE_SUCCEEDED)
    phases = [e.progress.phase for e in events if e.HasField("progress")]
    assert first.state == job_pb2.JOB_STATE_SUCCEEDED and "prune" in phases
    assert "warm_start" not in phases
    other = edge_pruning_spec(inline_examples(9), steps=3)  # other data: its own warm start
    events = list(live_server.watch(submit(live_server, other).name))
    assert "warm_start" in [e.progress.phase for e in events if e.HasField("progress")]


def test_a_run_short_of_its_target_says_so(live_server: Server) -> None:
    """Every mask on and four steps cannot reach 95 % sparsity: the job succeeds, and a
    TARGET_NOT_REACHED warning reaches the event stream and the stored result."""
    spec = edge_pruning_spec(steps=4, sizes=(0.95,))
    spec.edge_pruning.warm_start = job_pb2.WARM_START_NONE
    job = submit(live_server, spec)
    events = list(live_server.watch(job.name))
    check_event_log(events, job_pb2.JOB_STATE_SUCCEEDED)
    warnings = [e.warning for e in events if e.HasField("warning")]
    assert "TARGET_NOT_REACHED" in [w.reason for w in warnings]
    short = next(w for w in warnings if w.reason == "TARGET_NOT_REACHED")
    assert "short of the target 94.89%" in short.message and short.size_index == 0
    result = live_server.jobs.GetJob(job_pb2.GetJobRequest(name=job.name)).result
    stored = [w for w in result.warnings if w.reason == "TARGET_NOT_REACHED"]
    assert len(stored) == 1 and stored[0].message == short.message
    assert stored[0].circuit == result.circuits[0]  # the stored warning names its circuit
    last = [e.progress for e in events if e.progress.phase == "prune"][-1]
    assert last.loss_name == "kl" and last.kl == last.task_loss


def test_watch_reconnects_without_losing_or_repeating_events(live_server: Server) -> None:
    job = submit(live_server, edge_pruning_spec(steps=40))
    received: list[job_pb2.JobEvent] = []
    reconnects = 0
    while not received or not received[-1].state_change.state >= job_pb2.JOB_STATE_SUCCEEDED:
        after = received[-1].sequence if received else 0
        stream = live_server.jobs.WatchJob(job_pb2.WatchJobRequest(name=job.name,
                                                                   after_sequence=after))
        try:
            for i, event in enumerate(stream):
                received.append(event)
                if i == 4 and reconnects < 5:  # drop the connection mid-job
                    reconnects += 1
                    stream.cancel()
                    break
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.CANCELLED
    assert reconnects >= 2
    replay = list(live_server.watch(job.name))
    assert received == replay
    check_event_log(received, job_pb2.JOB_STATE_SUCCEEDED)


def test_many_watchers_see_the_same_events(live_server: Server) -> None:
    job = submit(live_server, edge_pruning_spec(steps=20))
    results: list[list[int]] = [[] for _ in range(10)]

    def watch(i: int) -> None:
        results[i] = [e.sequence for e in live_server.watch(job.name)]

    threads = [threading.Thread(target=watch, args=(i,)) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    final = live_server.wait_done(job.name)
    assert all(r == list(range(1, final.last_event_sequence + 1)) for r in results)


def _samples(text: str, family: str) -> float:
    """Sum of a family's sample values (counters, or a histogram's _count)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(family) and not line.startswith("#"):
            name = line.split("{")[0].split(" ")[0]
            if name == family:
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_move_during_a_job_and_pass_promtool(live_server: Server) -> None:
    before = live_server.metrics_text()
    job = submit(live_server, edge_pruning_spec(steps=8))
    _first_prune_event(live_server, job.name)
    during = live_server.metrics_text()
    assert _samples(during, "edgeprune_workers_busy") == 1
    live_server.wait_done(job.name)
    after = wait_for(lambda: (t := live_server.metrics_text()) and
                     _samples(t, "edgeprune_workers_busy") == 0 and t, what="worker idle")
    moved = {
        "grpc_server_started_total", "grpc_server_handled_total",
        "grpc_server_handling_seconds_count", "edgeprune_jobs_submitted_total",
        "edgeprune_jobs_finished_total", "edgeprune_job_duration_seconds_count",
        "edgeprune_step_seconds_count",
    }
    for family in moved:
        assert _samples(after, family) > _samples(before, family), family
    assert 'grpc_method="SubmitJob"' in after and 'grpc_code="OK"' in after
    assert 'grpc_type="server_stream"' in after
    assert _samples(after, "edgeprune_workers") == 1
    assert "edgeprune_queue_pending_jobs" in after
    assert "edgeprune_model_load_seconds_count" in after
    assert _samples(after, "edgeprune_device_memory_bytes") > 0
    check = subprocess.run(["promtool", "check", "metrics"], input=after, text=True,
                           capture_output=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr


def test_uploaded_dataset_with_eap_and_acdc(live_server: Server) -> None:
    from tests.service.test_api import upload

    rows = [{"clean": e.clean, "corrupted": e.corrupted, "target": e.target,
             "distractor": e.distractor} for e in edge_pruning_spec().data.examples.examples]
    dataset = upload(live_server, rows, display_name="ioi-upload")
    names = []
    for method in (common_pb2.METHOD_EAP, common_pb2.METHOD_ACDC):
        spec = job_pb2.JobSpec(model=MODEL, method=method, batch_size=8)
        spec.data.dataset = dataset.name
        spec.sizes.add(edge_count=20)
        spec.attribution.acdc_threshold = 0.05
        names.append(submit(live_server, spec).name)
    for name, method in zip(names, (common_pb2.METHOD_EAP, common_pb2.METHOD_ACDC), strict=True):
        job = live_server.wait_done(name)
        assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job.error
        circuit = live_server.circuits.GetCircuit(
            circuit_pb2.GetCircuitRequest(name=job.result.circuits[0]))
        assert circuit.method == method and circuit.dataset == dataset.name
        assert circuit.task == dataset.name
    listed = live_server.circuits.ListCircuits(circuit_pb2.ListCircuitsRequest(
        dataset=dataset.name, method=common_pb2.METHOD_EAP))
    assert [c.job for c in listed.circuits] == [names[0]]


def test_a_job_the_engine_rejects_fails_with_its_field(live_server: Server) -> None:
    spec = edge_pruning_spec()
    spec.data.examples.examples[0].corrupted = "a much longer corrupted prompt than the clean one"
    job = live_server.wait_done(submit(live_server, spec).name)
    assert job.state == job_pb2.JOB_STATE_FAILED
    assert job.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "examples[0]" in job.error.message and "Traceback" not in job.error.message
    events = list(live_server.watch(job.name))
    assert events[-1].state_change.error.code == job.error.code
