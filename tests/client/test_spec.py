"""Job specs from keyword arguments and job files; bad input is an InvalidArgument naming
the option, raised before anything is sent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeprune.client import InvalidArgument, job_spec, load_job_file
from edgeprune.client._spec import list_jobs_request, resource_name, submit_request
from edgeprune.v1 import common_pb2, job_pb2


def test_keywords_fill_every_part_of_the_spec() -> None:
    spec = job_spec(
        model="smollm2-135m", task="ioi", task_examples=64, task_seed=3, task_params={"template": "a"},
        eval_fraction=0.25, method="eap-ig", sparsity=[0.9, 0.98], steps=200, warmup_steps=150,
        lr=0.5, lambda_lr=1.0, node_masks=False, node_sparsity=0.5, warm_start="eap_ig",
        ig_steps=5, acdc_threshold=0.01, batch_size=16, seed=7, ablation="mean",
        loss="logit_diff", positions="all", dtype="bfloat16",
    )
    assert spec.model == "smollm2-135m"
    assert (spec.data.task.name, spec.data.task.example_count, spec.data.task.seed) == ("ioi", 64, 3)
    assert dict(spec.data.task.params) == {"template": "a"}
    assert spec.data.eval_fraction == 0.25
    assert spec.method == common_pb2.METHOD_EAP_IG
    assert [s.edge_sparsity for s in spec.sizes] == [0.9, 0.98]
    pruning = spec.edge_pruning
    assert (pruning.steps, pruning.warmup_steps, pruning.mask_learning_rate) == (200, 150, 0.5)
    assert pruning.lambda_learning_rate == 1.0
    assert pruning.HasField("node_masks") and not pruning.node_masks
    assert pruning.node_sparsity == 0.5
    assert pruning.warm_start == job_pb2.WARM_START_EAP_IG
    assert (spec.attribution.ig_steps, spec.attribution.acdc_threshold) == (5, 0.01)
    assert (spec.batch_size, spec.seed) == (16, 7)
    assert spec.ablation == common_pb2.ABLATION_MEAN
    assert spec.loss == common_pb2.LOSS_LOGIT_DIFF
    assert spec.positions == common_pb2.POSITION_MODE_ALL
    assert spec.dtype == common_pb2.DTYPE_BFLOAT16


def test_activation_checkpointing_keyword_and_job_file(tmp_path: Path) -> None:
    spec = job_spec(model="m", task="ioi", activation_checkpointing=True)
    assert spec.edge_pruning.activation_checkpointing
    assert not job_spec(model="m", task="ioi").edge_pruning.activation_checkpointing
    path = tmp_path / "job.yaml"
    path.write_text("model: m\ntask: ioi\nactivation_checkpointing: true\n")
    request = submit_request(request_id="r", **load_job_file(path))
    assert request.spec.edge_pruning.activation_checkpointing


def test_unset_options_stay_at_the_server_default() -> None:
    spec = job_spec(model="m", dataset="datasets/d1", edges=100)
    assert spec.data.dataset == "datasets/d1"
    assert spec.method == common_pb2.METHOD_EDGE_PRUNING
    assert spec.sizes[0].edge_count == 100
    assert not spec.HasField("edge_pruning") or spec.edge_pruning.steps == 0
    assert spec.ablation == common_pb2.ABLATION_UNSPECIFIED


def test_inline_examples_from_mappings_tuples_and_jsonl(tmp_path: Path) -> None:
    rows = [{"clean": "a b", "corrupted": "c b", "target": " x", "distractor": " y"}]
    path = tmp_path / "ex.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows * 2) + "\n\n")
    for source in (rows, [("a b", "c b", " x", " y")], path):
        spec = job_spec(model="m", examples=source, sparsity=0.5)
        assert spec.data.examples.examples[0] == common_pb2.Example(
            clean="a b", corrupted="c b", target=" x", distractor=" y"
        )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"model": ""}, "model"),
        ({"model": "m"}, "task"),
        ({"model": "m", "task": "ioi", "dataset": "d"}, "dataset"),
        ({"model": "m", "task": "ioi", "method": "magic"}, "method"),
        ({"model": "m", "task": "ioi", "sparsity": 0.9, "edges": 10}, "edges"),
        ({"model": "m", "task": "ioi", "edges": 10.5}, "edges"),
        ({"model": "m", "task": "ioi", "steps": "many"}, "steps"),
        ({"model": "m", "task": "ioi", "ablation": "half"}, "ablation"),
        ({"model": "m", "task": "ioi", "warm_start": "circuits/x"}, "warm_start"),
        ({"model": "m", "examples": [{"clean": "a", "nope": 1}]}, "examples[0]"),
        ({"model": "m", "examples": [42]}, "examples[0]"),
    ],
)
def test_bad_keywords_name_the_option(kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        job_spec(**kwargs)
    assert caught.value.field == field
    assert caught.value.exit_code == 3


def test_unknown_option_and_spec_plus_keywords_are_rejected() -> None:
    with pytest.raises(InvalidArgument, match="unknown job option 'stepz'") as caught:
        submit_request(model="m", task="ioi", stepz=3, request_id="r")
    assert caught.value.field == "stepz"
    with pytest.raises(InvalidArgument, match="not both"):
        submit_request(job_pb2.JobSpec(model="m"), steps=3, request_id="r")


def test_a_protobuf_spec_passes_through() -> None:
    spec = job_spec(model="m", task="ioi")
    request = submit_request(spec, priority=5, labels={"a": 1}, request_id="r1")
    assert request.spec == spec and request.priority == 5
    assert dict(request.labels) == {"a": "1"} and request.request_id == "r1"


def test_job_files_flat_yaml_and_protobuf_json(tmp_path: Path) -> None:
    flat = tmp_path / "job.yaml"
    flat.write_text("model: smollm2-135m\ntask: ioi\nsparsity: 0.98\nsteps: 50\nlabels: {team: x}\n")
    options = load_job_file(flat)
    assert options["labels"] == {"team": "x"}
    request = submit_request(request_id="r", **options)
    assert request.spec.edge_pruning.steps == 50 and dict(request.labels) == {"team": "x"}

    proto = tmp_path / "job.json"
    proto.write_text(json.dumps({
        "spec": {"model": "m", "data": {"task": {"name": "ioi"}}, "method": "METHOD_EAP",
                 "sizes": [{"edge_count": 10}]},
        "priority": 3,
    }))
    options = load_job_file(proto)
    assert options["spec"].method == common_pb2.METHOD_EAP and options["priority"] == 3


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("model: [unclosed", "not valid YAML"),
        ("- a\n- b\n", "must hold a mapping"),
        ("model: m\nstepz: 3\n", "unknown option 'stepz'"),
        ('{"spec": {"modle": "m"}}', "job_file"),
    ],
)
def test_bad_job_files(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(InvalidArgument, match=match):
        load_job_file(path)
    with pytest.raises(InvalidArgument, match="cannot read job file"):
        load_job_file(tmp_path / "missing.yaml")


def test_names_and_states() -> None:
    assert resource_name("jobs", "abc") == "jobs/abc"
    assert resource_name("jobs", "jobs/abc") == "jobs/abc"
    with pytest.raises(InvalidArgument):
        resource_name("jobs", "circuits/abc")
    request = list_jobs_request(states=["running", "JOB_STATE_PENDING"], labels={"a": "b"})
    assert list(request.states) == [job_pb2.JOB_STATE_RUNNING, job_pb2.JOB_STATE_PENDING]


def test_data_parallel_workers_keyword_and_job_file(tmp_path: Path) -> None:
    assert job_spec(model="m", task="ioi", data_parallel_workers=2).data_parallel_workers == 2
    assert job_spec(model="m", task="ioi").data_parallel_workers == 0
    path = tmp_path / "job.yaml"
    path.write_text("model: m\ntask: ioi\ndata_parallel_workers: 2\n")
    assert submit_request(request_id="r", **load_job_file(path)).spec.data_parallel_workers == 2
    with pytest.raises(InvalidArgument) as info:
        job_spec(model="m", task="ioi", data_parallel_workers="two")
    assert info.value.field == "data_parallel_workers"
