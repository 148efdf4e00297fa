"""Building requests from keyword arguments, job files and names.

``job_spec(model="smollm2-135m", task="ioi", sparsity=0.98, steps=200)`` gives the
``edgeprune.v1.JobSpec`` a SubmitJob needs; the same keys make a YAML/JSON job file
(see :func:`load_job_file`). Bad values raise :class:`InvalidArgument` naming the
keyword, before anything is sent.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from google.protobuf import json_format
from google.protobuf.message import Message

from edgeprune.v1 import circuit_pb2, common_pb2, dataset_pb2, job_pb2

from .errors import InvalidArgument

__all__ = [
    "JOB_KEYS",
    "cancel_job_request",
    "compare_request",
    "delete_dataset_request",
    "enum_value",
    "evaluate_request",
    "export_format",
    "export_request",
    "get_circuit_request",
    "get_dataset_request",
    "get_job_request",
    "job_spec",
    "list_circuits_request",
    "list_datasets_request",
    "list_jobs_request",
    "load_examples",
    "load_job_file",
    "resource_name",
    "submit_request",
    "view_value",
]

_M = TypeVar("_M", bound=Message)

#: Keys accepted by :func:`job_spec` (and job files), besides the request-level
#: ``priority``, ``labels`` and ``request_id``.
JOB_KEYS = frozenset(
    {
        "model", "task", "task_examples", "task_seed", "task_params", "dataset", "examples",
        "all_positions", "eval_fraction", "method", "sparsity", "edges", "sizes", "steps",
        "warmup_steps", "lr", "lambda_lr", "node_masks", "node_sparsity", "warm_start",
        "warm_start_ig_steps", "ig_steps", "acdc_threshold", "batch_size", "seed", "ablation", "loss", "positions",
        "dtype", "activation_checkpointing", "data_parallel_workers",
    }
)
_REQUEST_KEYS = frozenset({"priority", "labels", "request_id"})


def resource_name(collection: str, name: str, *, field: str = "name") -> str:
    """``("jobs", "abc")`` -> ``"jobs/abc"``; a full name is returned as is."""
    name = (name or "").strip()
    if not name:
        raise InvalidArgument(f"a {collection[:-1]} name is required", field=field)
    if name.startswith(collection + "/"):
        return name
    if "/" in name:
        raise InvalidArgument(f"{name!r} is not a {collection[:-1]} name", field=field)
    return f"{collection}/{name}"


def enum_value(enum: Any, value: str | int, *, prefix: str, field: str) -> int:
    """An enum number from ``"eap_ig"``, ``"METHOD_EAP_IG"``, ``"eap-ig"`` or the number."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value in enum.values():
            return value
    elif isinstance(value, str):
        key = value.strip().upper().replace("-", "_")
        key = key if key.startswith(prefix) else prefix + key
        if key in set(enum.keys()) and not key.endswith("_UNSPECIFIED"):
            return int(enum.Value(key))
    choices = ", ".join(
        k[len(prefix) :].lower() for k in list(enum.keys()) if not k.endswith("_UNSPECIFIED")
    )
    raise InvalidArgument(f"unknown {field} {value!r}; choose one of: {choices}", field=field)


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _number(value: Any, kind: type, field: str) -> Any:
    try:
        if isinstance(value, bool):
            raise TypeError
        number = kind(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"{field} must be a number, got {value!r}", field=field) from None
    if kind is int and number != float(value):
        raise InvalidArgument(f"{field} must be a whole number, got {value!r}", field=field)
    return number


def _sizes(sparsity: Any, edges: Any, sizes: Any) -> list[common_pb2.CircuitSize]:
    """CircuitSize messages from ``sparsity=0.98``, ``edges=[100, 500]`` or ``sizes=[...]``."""
    given = [n for n, v in (("sparsity", sparsity), ("edges", edges), ("sizes", sizes)) if v is not None]
    if len(given) > 1:
        raise InvalidArgument(f"give only one of {' / '.join(given)}", field=given[1])
    out: list[common_pb2.CircuitSize] = []
    for value in _as_list(sparsity) if sparsity is not None else []:
        out.append(common_pb2.CircuitSize(edge_sparsity=_number(value, float, "sparsity")))
    for value in _as_list(edges) if edges is not None else []:
        out.append(common_pb2.CircuitSize(edge_count=_number(value, int, "edges")))
    for value in _as_list(sizes) if sizes is not None else []:
        if isinstance(value, common_pb2.CircuitSize):
            out.append(value)
        elif isinstance(value, Mapping):
            out.append(_parse(value, common_pb2.CircuitSize(), "sizes"))
        else:
            raise InvalidArgument(
                "sizes entries are CircuitSize messages or mappings such as "
                "{'edge_count': 100} / {'edge_sparsity': 0.98} / {'edge_fraction': 0.01}",
                field="sizes",
            )
    return out


def _parse(value: Mapping[str, Any], message: _M, field: str) -> _M:
    try:
        return json_format.ParseDict(dict(value), message)
    except json_format.ParseError as error:
        raise InvalidArgument(f"{field}: {error}", field=field) from None


def _example(value: Any, index: int) -> common_pb2.Example:
    if isinstance(value, common_pb2.Example):
        return value
    if isinstance(value, Mapping):
        return _parse(value, common_pb2.Example(), f"examples[{index}]")
    if isinstance(value, Sequence) and not isinstance(value, str) and 2 <= len(value) <= 4:
        return common_pb2.Example(**dict(zip(("clean", "corrupted", "target", "distractor"), value)))
    raise InvalidArgument(
        f"examples[{index}] must be a mapping with clean/corrupted/target/distractor",
        field=f"examples[{index}]",
    )


def load_examples(source: str | os.PathLike[str] | Iterable[Any]) -> list[common_pb2.Example]:
    """Examples from a JSONL file (one object per line) or an iterable of mappings/messages."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise InvalidArgument(f"cannot read {path}: {error.strerror}", field="examples") from None
        rows = []
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise InvalidArgument(
                        f"{path}:{number}: not JSON ({error.msg})", field="examples"
                    ) from None
        source = rows
    return [_example(value, i) for i, value in enumerate(source)]


def _data_spec(
    *,
    task: Any,
    task_examples: Any,
    task_seed: Any,
    task_params: Mapping[str, Any] | None,
    dataset: str | None,
    examples: Any,
    all_positions: bool,
    eval_fraction: Any,
) -> job_pb2.DataSpec:
    given = [n for n, v in (("task", task), ("dataset", dataset), ("examples", examples)) if v is not None]
    if len(given) != 1:
        raise InvalidArgument(
            "give exactly one of task / dataset / examples" + (f" (got {', '.join(given)})" if given else ""),
            field=given[1] if len(given) > 1 else "task",
        )
    data = job_pb2.DataSpec()
    if eval_fraction is not None:
        data.eval_fraction = _number(eval_fraction, float, "eval_fraction")
    if isinstance(task, job_pb2.TaskSource):
        data.task.CopyFrom(task)
    elif task is not None:
        data.task.name = str(task)
        if task_examples is not None:
            data.task.example_count = _number(task_examples, int, "task_examples")
        if task_seed is not None:
            data.task.seed = _number(task_seed, int, "task_seed")
        for key, value in (task_params or {}).items():
            # the server reads booleans as true / false (Python's str gives True / False)
            data.task.params[str(key)] = str(value).lower() if isinstance(value, bool) else str(value)
    elif dataset is not None:
        data.dataset = resource_name("datasets", dataset, field="dataset")
    else:
        data.examples.examples.extend(load_examples(examples))
        data.examples.all_positions = bool(all_positions)
    return data


def job_spec(
    *,
    model: str,
    task: str | job_pb2.TaskSource | None = None,
    task_examples: int | None = None,
    task_seed: int | None = None,
    task_params: Mapping[str, Any] | None = None,
    dataset: str | None = None,
    examples: str | os.PathLike[str] | Iterable[Any] | None = None,
    all_positions: bool = False,
    eval_fraction: float | None = None,
    method: str | int = "edge_pruning",
    sparsity: float | Sequence[float] | None = None,
    edges: int | Sequence[int] | None = None,
    sizes: Sequence[Any] | None = None,
    steps: int | None = None,
    warmup_steps: int | None = None,
    lr: float | None = None,
    lambda_lr: float | None = None,
    node_masks: bool | None = None,
    node_sparsity: float | None = None,
    warm_start: str | bool | None = None,
    warm_start_ig_steps: int | None = None,
    activation_checkpointing: bool | None = None,
    ig_steps: int | None = None,
    acdc_threshold: float | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    ablation: str | int | None = None,
    loss: str | int | None = None,
    positions: str | int | None = None,
    dtype: str | int | None = None,
    data_parallel_workers: int | None = None,
) -> job_pb2.JobSpec:
    """A JobSpec from keyword arguments; None means "the server's default".

    Data: exactly one of ``task`` (a built-in task name such as ``"ioi"``, with
    ``task_examples``, ``task_seed`` and ``task_params``), ``dataset`` (an uploaded
    dataset's name) or ``examples`` (a JSONL path or an iterable of
    ``{clean, corrupted, target, distractor}`` mappings). Size: ``sparsity`` (fraction
    of edges removed), ``edges`` (edges kept) or ``sizes`` (CircuitSize messages or
    mappings); a list of several sizes makes a sweep. ``method`` is ``edge_pruning``,
    ``eap``, ``eap_ig`` (integrated over the input embeddings, as MIB), ``eap_ig_edges``
    (integrated over the edge masks) or ``acdc``; ``lr`` is the mask learning rate;
    ``warm_start="eap_ig"`` (the server's default; True too) starts the masks from EAP-IG
    scores (``warm_start_ig_steps`` integration steps), ``"none"`` (or False) with every mask on
    as in the paper;
    ``activation_checkpointing=True`` recomputes each layer in the backward pass (less memory);
    ``data_parallel_workers=N`` spreads an Edge Pruning job over N processes of its worker.
    """
    if not isinstance(model, str) or not model.strip():
        raise InvalidArgument("model is required (e.g. 'smollm2-135m')", field="model")
    spec = job_pb2.JobSpec(model=model.strip())
    spec.data.CopyFrom(
        _data_spec(
            task=task, task_examples=task_examples, task_seed=task_seed, task_params=task_params,
            dataset=dataset, examples=examples, all_positions=all_positions,
            eval_fraction=eval_fraction,
        )
    )
    spec.method = enum_value(common_pb2.Method, method, prefix="METHOD_", field="method")
    spec.sizes.extend(_sizes(sparsity, edges, sizes))
    for name, value, kind in (
        ("batch_size", batch_size, int),
        ("seed", seed, int),
        ("data_parallel_workers", data_parallel_workers, int),
    ):
        if value is not None:
            setattr(spec, name, _number(value, kind, name))
    enums = (
        ("ablation", ablation, common_pb2.Ablation, "ABLATION_"),
        ("loss", loss, common_pb2.Loss, "LOSS_"),
        ("positions", positions, common_pb2.PositionMode, "POSITION_MODE_"),
        ("dtype", dtype, common_pb2.Dtype, "DTYPE_"),
    )
    for name, value, enum, prefix in enums:
        if value is not None:
            setattr(spec, name, enum_value(enum, value, prefix=prefix, field=name))
    pruning = spec.edge_pruning
    for name, field, value, kind in (
        ("steps", "steps", steps, int),
        ("warmup_steps", "warmup_steps", warmup_steps, int),
        ("lr", "mask_learning_rate", lr, float),
        ("lambda_lr", "lambda_learning_rate", lambda_lr, float),
        ("node_sparsity", "node_sparsity", node_sparsity, float),
    ):
        if value is not None:
            setattr(pruning, field, _number(value, kind, name))
    if node_masks is not None:
        pruning.node_masks = bool(node_masks)
    if activation_checkpointing is not None:
        pruning.activation_checkpointing = bool(activation_checkpointing)
    if warm_start is not None:
        value = {True: "eap_ig", False: "none"}.get(warm_start, warm_start)  # type: ignore[call-overload]
        pruning.warm_start = enum_value(job_pb2.WarmStart, value, prefix="WARM_START_", field="warm_start")
    if warm_start_ig_steps is not None:
        pruning.warm_start_ig_steps = _number(warm_start_ig_steps, int, "warm_start_ig_steps")
    if ig_steps is not None:
        spec.attribution.ig_steps = _number(ig_steps, int, "ig_steps")
    if acdc_threshold is not None:
        spec.attribution.acdc_threshold = _number(acdc_threshold, float, "acdc_threshold")
    return spec


def submit_request(
    spec: job_pb2.JobSpec | None = None,
    *,
    priority: int = 0,
    labels: Mapping[str, str] | None = None,
    request_id: str,
    **kwargs: Any,
) -> job_pb2.SubmitJobRequest:
    """A SubmitJobRequest from a JobSpec (passed through) or :func:`job_spec` keywords."""
    if spec is not None and kwargs:
        raise InvalidArgument(
            f"give a JobSpec or keyword arguments, not both (got {', '.join(sorted(kwargs))})",
            field=min(kwargs),
        )
    unknown = sorted(set(kwargs) - JOB_KEYS)
    if unknown:
        raise InvalidArgument(
            f"unknown job option {unknown[0]!r}; known: {', '.join(sorted(JOB_KEYS))}",
            field=unknown[0],
        )
    if spec is None:
        spec = job_spec(**kwargs)
    elif not isinstance(spec, job_pb2.JobSpec):
        raise InvalidArgument("spec must be an edgeprune.v1.JobSpec", field="spec")
    return job_pb2.SubmitJobRequest(
        spec=spec,
        priority=_number(priority, int, "priority"),
        labels={str(k): str(v) for k, v in (labels or {}).items()},
        request_id=request_id,
    )


def load_job_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The options of a YAML or JSON job file, as keywords for ``Client.submit``.

    Two forms: the flat keys of :func:`job_spec` plus ``priority``/``labels``, e.g.::

        model: smollm2-135m
        task: ioi
        task_examples: 64
        method: edge_pruning
        sparsity: 0.98
        steps: 200
        labels: {team: interp}

    or a SubmitJobRequest in protobuf JSON form (a top-level ``spec`` key, any
    language's client can write it); that form is returned as ``{"spec": JobSpec, ...}``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise InvalidArgument(f"cannot read job file {path}: {error.strerror}", field="job_file") from None
    try:
        data = yaml.safe_load(text)  # JSON is YAML
    except yaml.YAMLError as error:
        raise InvalidArgument(f"job file {path} is not valid YAML/JSON: {error}", field="job_file") from None
    if not isinstance(data, dict):
        raise InvalidArgument(f"job file {path} must hold a mapping of options", field="job_file")
    if "spec" in data:
        request = _parse(data, job_pb2.SubmitJobRequest(), "job_file")
        out: dict[str, Any] = {"spec": request.spec, "priority": request.priority}
        if request.labels:
            out["labels"] = dict(request.labels)
        if request.request_id:
            out["request_id"] = request.request_id
        return out
    unknown = sorted(set(data) - JOB_KEYS - _REQUEST_KEYS)
    if unknown:
        raise InvalidArgument(f"job file {path}: unknown option {unknown[0]!r}", field=unknown[0])
    return data


def export_format(value: str | int) -> int:
    """An ExportFormat number from ``"svg"``, ``"json"``, ``"dot"``, ``"png"``,
    ``"safetensors"`` or ``"mib"``."""
    return enum_value(circuit_pb2.ExportFormat, value, prefix="EXPORT_FORMAT_", field="format")


def view_value(full: bool) -> int:
    """The View enum for a ``full=`` flag."""
    return common_pb2.VIEW_FULL if full else common_pb2.VIEW_BASIC


def list_jobs_request(
    *,
    states: Iterable[str | int] | None = None,
    model: str | None = None,
    labels: Mapping[str, str] | None = None,
    full: bool = False,
    page_size: int = 0,
) -> job_pb2.ListJobsRequest:
    """A ListJobsRequest; ``states`` as names (``"running"``) or JobState numbers."""
    return job_pb2.ListJobsRequest(
        page_size=_number(page_size, int, "page_size"),
        states=[enum_value(job_pb2.JobState, s, prefix="JOB_STATE_", field="states") for s in states or ()],
        model=model or "",
        labels={str(k): str(v) for k, v in (labels or {}).items()},
        view=view_value(full),
    )


def list_circuits_request(
    *,
    model: str | None = None,
    task: str | None = None,
    dataset: str | None = None,
    method: str | int | None = None,
    min_edges: int | None = None,
    max_edges: int | None = None,
    contains_edge: str | None = None,
    contains_node: str | None = None,
    job: str | None = None,
    full: bool = False,
    page_size: int = 0,
) -> circuit_pb2.ListCircuitsRequest:
    """A ListCircuitsRequest; filters combine with AND, None means no filter."""
    request = circuit_pb2.ListCircuitsRequest(
        page_size=_number(page_size, int, "page_size"),
        model=model or "",
        task=task or "",
        contains_edge=contains_edge or "",
        contains_node=contains_node or "",
        view=view_value(full),
    )
    if dataset:
        request.dataset = resource_name("datasets", dataset, field="dataset")
    if job:
        request.job = resource_name("jobs", job, field="job")
    if method is not None:
        request.method = enum_value(common_pb2.Method, method, prefix="METHOD_", field="method")
    if min_edges is not None:
        request.min_edge_count = _number(min_edges, int, "min_edges")
    if max_edges is not None:
        request.max_edge_count = _number(max_edges, int, "max_edges")
    return request


def evaluate_request(
    circuit: str,
    *,
    task: str | None = None,
    task_examples: int | None = None,
    task_seed: int | None = None,
    task_params: Mapping[str, Any] | None = None,
    dataset: str | None = None,
    examples: str | os.PathLike[str] | Iterable[Any] | None = None,
    all_positions: bool = False,
    ablation: str | int | None = None,
    batch_size: int | None = None,
    dtype: str | int | None = None,
    priority: int = 0,
    labels: Mapping[str, str] | None = None,
    request_id: str,
) -> circuit_pb2.EvaluateCircuitRequest:
    """An EvaluateCircuitRequest: a stored circuit on a task, dataset or examples."""
    spec = job_pb2.EvaluationSpec(circuit=resource_name("circuits", circuit, field="circuit"))
    spec.data.CopyFrom(
        _data_spec(
            task=task, task_examples=task_examples, task_seed=task_seed, task_params=task_params,
            dataset=dataset, examples=examples, all_positions=all_positions, eval_fraction=None,
        )
    )
    if ablation is not None:
        spec.ablation = enum_value(common_pb2.Ablation, ablation, prefix="ABLATION_", field="ablation")
    if batch_size is not None:
        spec.batch_size = _number(batch_size, int, "batch_size")
    if dtype is not None:
        spec.dtype = enum_value(common_pb2.Dtype, dtype, prefix="DTYPE_", field="dtype")
    return circuit_pb2.EvaluateCircuitRequest(
        evaluation=spec,
        priority=_number(priority, int, "priority"),
        labels={str(k): str(v) for k, v in (labels or {}).items()},
        request_id=request_id,
    )


def get_job_request(name: str, *, full: bool = False) -> job_pb2.GetJobRequest:
    """A GetJobRequest for a job name or id."""
    return job_pb2.GetJobRequest(name=resource_name("jobs", name), view=view_value(full))


def cancel_job_request(name: str) -> job_pb2.CancelJobRequest:
    """A CancelJobRequest for a job name or id."""
    return job_pb2.CancelJobRequest(name=resource_name("jobs", name))


def delete_job_request(name: str) -> job_pb2.DeleteJobRequest:
    """A DeleteJobRequest for a job name or id."""
    return job_pb2.DeleteJobRequest(name=resource_name("jobs", name))


def delete_circuit_request(name: str) -> circuit_pb2.DeleteCircuitRequest:
    """A DeleteCircuitRequest for a circuit name or id."""
    return circuit_pb2.DeleteCircuitRequest(name=resource_name("circuits", name))


def get_dataset_request(name: str) -> dataset_pb2.GetDatasetRequest:
    """A GetDatasetRequest for a dataset name or id."""
    return dataset_pb2.GetDatasetRequest(name=resource_name("datasets", name))


def delete_dataset_request(name: str) -> dataset_pb2.DeleteDatasetRequest:
    """A DeleteDatasetRequest for a dataset name or id."""
    return dataset_pb2.DeleteDatasetRequest(name=resource_name("datasets", name))


def list_datasets_request(*, page_size: int = 0) -> dataset_pb2.ListDatasetsRequest:
    """A ListDatasetsRequest."""
    return dataset_pb2.ListDatasetsRequest(page_size=_number(page_size, int, "page_size"))


def get_circuit_request(name: str, *, full: bool = False) -> circuit_pb2.GetCircuitRequest:
    """A GetCircuitRequest for a circuit name or id."""
    return circuit_pb2.GetCircuitRequest(name=resource_name("circuits", name), view=view_value(full))


def export_request(
    name: str,
    format: str | int,
    *,
    top_k: int | None = None,
    nodes: Iterable[str] = (),
    view: str | int | None = None,
    plot: str | int | None = None,
    layout: str | int | None = None,
) -> circuit_pb2.ExportCircuitRequest:
    """An ExportCircuitRequest; ``format`` is json, dot, svg, png, safetensors or mib. Drawings
    (dot, svg, png) take ``top_k`` (the k most important edges), ``nodes`` (only edges touching
    them), ``view`` (edges or nodes), ``plot`` (drawing or per_layer; svg and png) and
    ``layout`` (graphviz or builtin)."""
    request = circuit_pb2.ExportCircuitRequest(
        name=resource_name("circuits", name), format=export_format(format),
        top_k=top_k or 0, nodes=list(nodes),
    )
    if view is not None:
        request.view = enum_value(circuit_pb2.DrawingView, view, prefix="DRAWING_VIEW_",
                                  field="view")
    if plot is not None:
        request.plot = enum_value(circuit_pb2.CircuitPlot, plot, prefix="CIRCUIT_PLOT_",
                                  field="plot")
    if layout is not None:
        request.layout = enum_value(circuit_pb2.DrawingLayout, layout, prefix="DRAWING_LAYOUT_",
                                    field="layout")
    return request


def job_plot_request(name: str, plot: str | int | None = None,
                     format: str | int = "svg") -> job_pb2.ExportJobPlotRequest:
    """An ExportJobPlotRequest: ``plot`` training or faithfulness (None: the server picks
    training for Edge Pruning jobs), ``format`` svg or png."""
    request = job_pb2.ExportJobPlotRequest(
        name=resource_name("jobs", name),
        format=enum_value(job_pb2.ImageFormat, format, prefix="IMAGE_FORMAT_", field="format"))
    if plot is not None:
        request.plot = enum_value(job_pb2.JobPlot, plot, prefix="JOB_PLOT_", field="plot")
    return request


def import_request(
    source: str | os.PathLike[str] | bytes | Mapping[str, Any],
    *,
    model: str,
    method: str | int | None = None,
    task: str = "",
    request_id: str = "",
) -> circuit_pb2.ImportCircuitRequest:
    """An ImportCircuitRequest from a MIB circuit file: its path, its bytes, or the parsed object."""
    if isinstance(source, bytes):
        data = source
    elif isinstance(source, Mapping):
        data = json.dumps(source).encode()
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as err:
            raise InvalidArgument(f"cannot read {source}: {err.strerror}", field="mib_json") from None
    return circuit_pb2.ImportCircuitRequest(
        model=model, mib_json=data, task=task, request_id=request_id,
        method=0 if method is None else enum_value(common_pb2.Method, method, prefix="METHOD_",
                                                   field="method"))


def compare_request(first: str, second: str) -> circuit_pb2.CompareCircuitsRequest:
    """A CompareCircuitsRequest for two circuit names or ids."""
    return circuit_pb2.CompareCircuitsRequest(
        first=resource_name("circuits", first, field="first"),
        second=resource_name("circuits", second, field="second"),
    )
