"""The one place where the service's protobuf and storage forms meet the engine's.

Enum tables (built from the engine's names in ``edgeprune.engine.contract``, so a name the proto
lacks fails at import), a JobSpec as engine settings, a circuit between the engine and storage,
and job progress as a typed ``JobProgress``. The engine's torch-bound types are imported where
they are used, so the API process (which never runs a job) can import this module without torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format

from edgeprune.engine import contract, defaults
from edgeprune.engine.examples import Example
from edgeprune.engine.task_params import format_value
from edgeprune.storage import CircuitRecord, JobRecord, JobState, NewCircuit
from edgeprune.v1 import common_pb2, job_pb2, server_pb2

if TYPE_CHECKING:
    from edgeprune.engine.circuit import Circuit
    from edgeprune.engine.prune import PhaseProgress, ProgressEvent, PruneConfig

KIND_DISCOVERY = "discovery"
KIND_EVALUATION = "evaluation"


def _table(enum: Any, prefix: str, names: tuple[str, ...]) -> dict[int, str]:
    """proto value -> engine name, for every engine name (proto ``PREFIX_NAME``)."""
    return {enum.Value(f"{prefix}_{name.upper()}"): name for name in names}


METHODS = _table(common_pb2.Method, "METHOD", contract.METHODS)
METHODS_BY_NAME = {name: value for value, name in METHODS.items()}
ABLATIONS = _table(common_pb2.Ablation, "ABLATION", contract.ABLATIONS)
ABLATIONS_BY_NAME = {name: value for value, name in ABLATIONS.items()}
LOSSES = _table(common_pb2.Loss, "LOSS", contract.LOSSES)
LOSSES_BY_NAME = {name: value for value, name in LOSSES.items()}
DTYPES = _table(common_pb2.Dtype, "DTYPE", contract.DTYPES)
DTYPES_BY_NAME = {name: value for value, name in DTYPES.items()}
WARM_STARTS = _table(job_pb2.WarmStart, "WARM_START", contract.WARM_STARTS)
WARM_STARTS_BY_NAME = {name: value for value, name in WARM_STARTS.items()}
STATES = {state: job_pb2.JobState.Value(f"JOB_STATE_{state.value}") for state in JobState}
STATES_BY_PROTO = {proto: state for state, proto in STATES.items()}


def dtype_name(dtype: int, device: str, default: str = "") -> str:
    """The engine dtype of a spec's ``dtype`` on ``device`` (unset: ``default``, the workers'
    configured dtype, else the device's default)."""
    return DTYPES.get(dtype) or default or defaults.dtype_for(device)


def float_map(value: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics dict."""
    return {k: float(v) for k, v in value.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


# ---------------------------------------------------------------------------------------- specs


def parse_spec(record: JobRecord) -> job_pb2.JobSpec | job_pb2.EvaluationSpec:
    """The spec message of a job (JobSpec or EvaluationSpec by the job's kind): the stored
    bytes, or, for a record read without them, its JSON summary (no inline examples)."""
    message = job_pb2.EvaluationSpec() if record.kind == KIND_EVALUATION else job_pb2.JobSpec()
    if record.spec:
        message.ParseFromString(record.spec)
    else:
        json_format.ParseDict(jsonable(record.spec_json), message, ignore_unknown_fields=True)
    if isinstance(message, job_pb2.JobSpec):
        # An older API left these at 0 in the stored spec (its worker filled them in then):
        # a job queued before an upgrade runs as it would have.
        fill_method_defaults(message)
    return message


def fill_method_defaults(spec: job_pb2.JobSpec) -> None:
    """The method options whose 0 means "unset", set to their defaults in place: validation
    fills them for a new job, `parse_spec` for a spec an older API stored."""
    if spec.ablation == common_pb2.ABLATION_UNSPECIFIED:
        spec.ablation = ABLATIONS_BY_NAME[defaults.ABLATION]
    if spec.method == common_pb2.METHOD_EDGE_PRUNING:
        if spec.loss == common_pb2.LOSS_UNSPECIFIED:
            spec.loss = LOSSES_BY_NAME[defaults.LOSS]
        if not spec.edge_pruning.warm_start_ig_steps:
            spec.edge_pruning.warm_start_ig_steps = defaults.WARM_START_IG_STEPS
    elif spec.method == common_pb2.METHOD_ACDC and not spec.attribution.acdc_threshold:
        spec.attribution.acdc_threshold = defaults.ACDC_THRESHOLD
    elif METHODS.get(spec.method) in contract.IG_METHODS and not spec.attribution.ig_steps:
        spec.attribution.ig_steps = defaults.IG_STEPS


def jsonable(value: Any) -> Any:
    """A JSON-safe copy (Struct cannot hold NaN keys or non-str keys)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def size_to_dict(size: common_pb2.CircuitSize) -> dict[str, Any]:
    """A CircuitSize in its stored form (``{"edge_count": 40}``; unset: ``{}``)."""
    kind = size.WhichOneof("size")
    return {kind: getattr(size, kind)} if kind else {}


def size_to_proto(target: Mapping[str, Any]) -> common_pb2.CircuitSize:
    size = common_pb2.CircuitSize()
    for key in ("edge_sparsity", "edge_count", "edge_fraction"):
        if key in target:
            setattr(size, key, target[key])
            break
    return size


def size_kwargs(size: Mapping[str, Any], total_edge_count: int) -> dict[str, Any]:
    """A stored size -> engine keywords (edge_count / edge_sparsity / edge_target)."""
    if "edge_count" in size:
        return {"edge_count": min(int(size["edge_count"]), total_edge_count)}
    if "edge_fraction" in size:
        return {"edge_count": max(1, round(float(size["edge_fraction"]) * total_edge_count))}
    sparsity = float(size.get("edge_sparsity", 0.0))
    if sparsity > 1.0:  # an overshooting Lagrangian target: the masks decide the size
        return {"edge_target": sparsity}
    return {"edge_sparsity": sparsity}


def prune_config(spec: job_pb2.JobSpec, size: Mapping[str, Any], total_edge_count: int
                 ) -> PruneConfig:
    """The Edge Pruning run of a normalised JobSpec at one size."""
    from edgeprune.engine.prune import PruneConfig  # imports torch: workers only

    ep = spec.edge_pruning
    return PruneConfig(
        steps=ep.steps,
        batch_size=spec.batch_size,
        edge_lr=ep.mask_learning_rate,
        node_lr=ep.mask_learning_rate,
        lambda_lr=ep.lambda_learning_rate,
        target_warmup_steps=ep.warmup_steps,
        node_masks=ep.node_masks,
        node_loss=ep.HasField("node_sparsity"),
        node_target=ep.node_sparsity if ep.HasField("node_sparsity") else defaults.NODE_TARGET,
        loss=LOSSES[spec.loss],
        ablation=ABLATIONS[spec.ablation],
        seed=spec.seed,
        warm_start=WARM_STARTS.get(ep.warm_start),  # WARM_START_NONE: every mask starts on
        warm_start_ig_steps=ep.warm_start_ig_steps,
        activation_checkpointing=ep.activation_checkpointing,
        **size_kwargs(size, total_edge_count),
    )


def attribution_kwargs(spec: job_pb2.JobSpec) -> dict[str, Any]:
    """Keywords of ``attribution.acdc`` (ACDC) or ``attribution.attribute`` (the scored methods)
    for a normalised JobSpec; the method name is ``METHODS[spec.method]``."""
    common = {"ablation": ABLATIONS[spec.ablation], "batch_size": spec.batch_size}
    if spec.method == common_pb2.METHOD_ACDC:
        return {**common, "threshold": spec.attribution.acdc_threshold}
    if METHODS[spec.method] in contract.IG_METHODS:
        return {**common, "ig_steps": spec.attribution.ig_steps}
    return common


def evaluation_ablation(spec: job_pb2.EvaluationSpec, circuit: CircuitRecord) -> str:
    """An evaluation's ablation: the spec's, or where it names none the one the circuit was
    found with (its value depends on the circuit, so validation cannot fill it in)."""
    return ABLATIONS.get(spec.ablation) or circuit.settings.get("ablation", defaults.ABLATION)


# ---------------------------------------------------------------------------------------- tasks


def task_details() -> list[server_pb2.TaskInfo]:
    """Every built-in task with its metric and parameters, as GetServerInfo lists them."""
    return [
        server_pb2.TaskInfo(
            name=name, description=task.description, metric=task.metric,
            params=[server_pb2.TaskParam(
                name=p.name, type=p.type, default=format_value(p.default),
                description=p.description, minimum=p.minimum, maximum=p.maximum,
                choices=p.choices,
            ) for p in task.params],
        )
        for name, task in contract.BUILTIN.items()
    ]


def example_from_proto(ex: common_pb2.Example) -> Example:
    """An inline example as the engine's (empty answers are unset)."""
    return Example(clean=ex.clean, corrupted=ex.corrupted, target=ex.target or None,
                   distractor=ex.distractor or None, multi_token=ex.multi_token)


# ------------------------------------------------------------------------------------- circuits


def circuit_from_record(record: CircuitRecord) -> Circuit:
    """A stored circuit (read with ``full=True``) as the engine's Circuit."""
    from edgeprune.engine.circuit import Circuit  # imports torch: workers and exports only

    return Circuit(model=record.model, method=record.method, edges=list(record.edges or []),
                   edge_scores=dict(record.edge_scores or {}), nodes=list(record.nodes or []),
                   total_edge_count=record.total_edge_count, target=dict(record.target),
                   settings=dict(record.settings), provenance=dict(record.provenance),
                   metrics=dict(record.metrics))


def new_circuit(circuit: Circuit, *, spec: job_pb2.JobSpec, owner: str, job_id: str | None,
                task: str, target: Mapping[str, Any], total_node_count: int,
                mask_blob: str | None) -> NewCircuit:
    """An engine Circuit found by the job ``job_id`` (of ``spec``, submitted by ``owner``) as
    storage's NewCircuit; ``target`` is the requested size in its stored form."""
    return NewCircuit(
        owner=owner, model=spec.model, method=METHODS[spec.method], edges=circuit.edges,
        total_edge_count=circuit.total_edge_count, nodes=circuit.nodes,
        total_node_count=total_node_count,
        edge_scores=circuit.edge_scores, task=task,
        dataset_id=spec.data.dataset.removeprefix("datasets/") or None, job_id=job_id,
        target=dict(target), settings=circuit.settings, provenance=circuit.provenance,
        metrics=circuit.metrics, mask_blob=mask_blob,
    )


# ------------------------------------------------------------------------------------- progress


def phase(name: str, step: int = 0, total_steps: int = 0) -> job_pb2.JobProgress:
    return job_pb2.JobProgress(phase=name, step=step, total_steps=total_steps)


def progress(event: ProgressEvent | PhaseProgress) -> job_pb2.JobProgress:
    """The JobProgress of an engine progress event (a PhaseProgress, or a pruning step)."""
    from edgeprune.engine.prune import PhaseProgress  # imports torch: workers only

    if isinstance(event, PhaseProgress):
        return phase(event.phase, event.step, event.total_steps)
    remaining = event.total_steps - event.step
    return job_pb2.JobProgress(
        phase="prune",
        step=event.step,
        total_steps=event.total_steps,
        loss=event.loss,
        loss_name=event.loss_name,
        task_loss=event.task_loss,
        kl=event.task_loss if event.loss_name == "kl" else 0.0,
        sparsity_loss=event.sparsity_loss,
        expected_edge_sparsity=event.expected_sparsity,
        expected_node_sparsity=event.node_sparsity or 0.0,
        target_edge_sparsity=event.target,
        lambdas=list(event.lambdas.values()),
        steps_per_second=event.steps_per_s,
        eta_seconds=remaining / event.steps_per_s if event.steps_per_s > 0 else 0.0,
    )


def progress_payload(value: job_pb2.JobProgress) -> dict[str, Any]:
    """A JobProgress as the JSON stored with its event (the fields set, in their proto names)."""
    return {field.name: list(v) if field.is_repeated else v for field, v in value.ListFields()}


def progress_from_payload(payload: Mapping[str, Any]) -> job_pb2.JobProgress:
    """Inverse of `progress_payload`. Workers write only JobProgress fields; a field unknown
    here was written by a newer worker during a rolling upgrade and is left out."""
    return json_format.ParseDict(jsonable(payload), job_pb2.JobProgress(),
                                 ignore_unknown_fields=True)
