"""Built-in tasks with parameters and multi-token answers through a real server, on SQLite and
PostgreSQL: the task listing with its params schema, params and multi-token data checked at
submit (INVALID_ARGUMENT naming the field, nothing stored), and MCQA and multi-token jobs run by a
worker on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from edgeprune.engine.tasks import build_task
from edgeprune.v1 import circuit_pb2, common_pb2, job_pb2, server_pb2
from tests.service.errors import fails
from tests.service.harness import MODEL, Server
from tests.service.test_api import upload
from tests.service.test_bad_input import invalid


def _task_spec(name: str, params: dict[str, str], *, method: int = common_pb2.METHOD_EAP,
               examples: int = 8) -> job_pb2.JobSpec:
    spec = job_pb2.JobSpec(model=MODEL, method=method, batch_size=4)
    spec.data.task.name = name
    spec.data.task.example_count = examples
    spec.data.task.params.update(params)
    spec.sizes.add(edge_count=20)
    return spec


def _arithmetic_rows(tiny_gpt2_dir: Path, n: int) -> list[dict[str, str]]:
    """Multi-token rows as the engine's generator writes them (JSONL), for the tiny tokenizer."""
    tok = AutoTokenizer.from_pretrained(str(tiny_gpt2_dir))
    data = build_task("arithmetic", tok, n=n, seed=5, params={"max_operand": 999})
    return [json.loads(line) for line in data.to_jsonl().splitlines()]


def test_server_info_lists_each_tasks_params(api_server: Server) -> None:
    info = api_server.info.GetServerInfo(server_pb2.GetServerInfoRequest(), timeout=60)
    details = {t.name: t for t in info.task_details}
    assert list(details) == list(info.tasks) and {"mcqa", "arithmetic"} <= set(details)
    assert details["ioi"].metric == "logit_diff" and not details["ioi"].params
    [n_choices] = details["mcqa"].params
    assert (n_choices.name, n_choices.type, n_choices.default) == ("n_choices", "int", "4")
    assert (n_choices.minimum, n_choices.maximum) == (2, 4)
    params = {p.name: p for p in details["arithmetic"].params}
    assert list(params["operation"].choices) == ["add", "sub"]
    assert params["multi_token"].default == "true" and not params["multi_token"].HasField("minimum")


@pytest.mark.parametrize("name, params, key", [
    ("mcqa", {"n_choices": "5"}, "n_choices"),
    ("mcqa", {"n_choices": "2.5"}, "n_choices"),
    ("mcqa", {"colours": "3"}, "colours"),
    ("arithmetic", {"operation": "div"}, "operation"),
    ("arithmetic", {"multi_token": "sometimes"}, "multi_token"),
    ("ioi", {"names": "Mary"}, "names"),
])
def test_bad_task_params_are_rejected_with_their_field(api_server: Server, name: str,
                                                       params: dict[str, str], key: str) -> None:
    request = job_pb2.SubmitJobRequest(spec=_task_spec(name, params))
    invalid(api_server, api_server.jobs.SubmitJob, request, f"spec.data.task.params[{key!r}]")


def test_every_bad_param_is_listed(api_server: Server) -> None:
    spec = _task_spec("arithmetic", {"operation": "div", "max_operand": "1", "multi_token": "true"})
    code, _, fields = fails(api_server.jobs.SubmitJob, job_pb2.SubmitJobRequest(spec=spec))
    assert (code, sorted(fields)) == ("INVALID_ARGUMENT", ["spec.data.task.params['max_operand']",
                                                           "spec.data.task.params['operation']"])


def test_bad_multi_token_data_is_rejected_with_its_field(api_server: Server,
                                                         tiny_gpt2_dir: Path) -> None:
    spec = _task_spec("ioi", {})
    spec.data.ClearField("task")
    spec.data.examples.examples.add(clean="12 + 35 =", corrupted="14 + 31 =", multi_token=True)
    invalid(api_server, api_server.jobs.SubmitJob, job_pb2.SubmitJobRequest(spec=spec),
            "spec.data.examples.examples[0].target")
    spec.data.examples.examples[0].target = " 47"
    spec.data.examples.all_positions = True
    invalid(api_server, api_server.jobs.SubmitJob, job_pb2.SubmitJobRequest(spec=spec),
            "spec.data.examples.examples[0].multi_token")
    # an upload that only the tokenizer can judge: a distractor longer than its target
    rows = _arithmetic_rows(tiny_gpt2_dir, 2)
    rows[1]["distractor"] = str(rows[1]["target"]) + "0000"
    dataset = upload(api_server, rows)
    spec = _task_spec("ioi", {})
    spec.data.dataset = dataset.name
    code, reason, fields = fails(api_server.jobs.SubmitJob, job_pb2.SubmitJobRequest(spec=spec))
    assert (code, reason, fields[:1]) == ("INVALID_ARGUMENT", "DATASET_DOES_NOT_FIT_MODEL",
                                          ["spec.data.dataset"])
    # uploads take the flag as JSON's true or false only
    code, _, fields = fails(upload, api_server, [{**rows[0], "multi_token": "yes"}])
    assert code == "INVALID_ARGUMENT" and fields == ["chunk line 1"]


def test_mcqa_and_multi_token_jobs(live_server: Server, tiny_gpt2_dir: Path) -> None:
    mcqa = _task_spec("mcqa", {"n_choices": "2"}, method=common_pb2.METHOD_EAP_IG)
    mcqa.attribution.ig_steps = 2
    uploaded = _task_spec("ioi", {}, method=common_pb2.METHOD_EDGE_PRUNING)
    uploaded.data.dataset = upload(live_server, _arithmetic_rows(tiny_gpt2_dir, 12)).name
    uploaded.edge_pruning.steps = 4
    uploaded.edge_pruning.warm_start_ig_steps = 1
    inline = _task_spec("ioi", {})
    inline.data.ClearField("task")
    for row in _arithmetic_rows(tiny_gpt2_dir, 4):
        inline.data.examples.examples.add(**row)
    names = [live_server.jobs.SubmitJob(job_pb2.SubmitJobRequest(spec=s), timeout=30).name
             for s in (mcqa, uploaded, inline)]
    for name, task in zip(names, ("mcqa", uploaded.data.dataset, "custom"), strict=True):
        job = live_server.wait_done(name, timeout=300)
        assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job.error.message
        circuit = live_server.circuits.GetCircuit(
            circuit_pb2.GetCircuitRequest(name=job.result.circuits[0]))
        assert circuit.task == task and circuit.edge_count > 0
        assert {"kl", "logit_diff", "faithfulness"} <= set(circuit.metrics)
