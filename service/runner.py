"""One job on the engine: a stored JobSpec / EvaluationSpec in, circuits and metrics out.

The worker supplies `Hooks` (progress, checkpoint, stop) and stores what `run_discovery` /
`run_evaluation` return. Edge Pruning trains one run, at the sparsest requested size, and cuts
every requested size from its masks (the EAP-IG warm start keeps the edges below the trained
size in their attribution order; its checkpoints are `job_checkpoint`'s). The spec is read as it
is stored: validation filled every default in, and `translate` maps it onto the engine. Results that fall short of the request carry warnings (see ``engine/diagnostics.py``), sent to
the job's event stream as soon as they are known and stored with the result.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from safetensors.torch import save as save_safetensors

from edgeprune.engine import attribution, diagnostics
from edgeprune.engine.circuit import Circuit, requested_edges
from edgeprune.engine.distributed import ModelSpec, prune_data_parallel
from edgeprune.engine.errors import InvalidArgument, Stopped
from edgeprune.engine.graph import Graph
from edgeprune.engine.masked import CircuitModel
from edgeprune.engine.memory import ModelShape, check_fits
from edgeprune.engine.metrics import evaluate_many
from edgeprune.engine.prune import PruneConfig, prune
from edgeprune.engine.sweep import cmd, cpr
from edgeprune.engine.tasks import TaskDataset
from edgeprune.service import memory_check, tracing, translate
from edgeprune.service.job_checkpoint import (
    checkpoint_discarded,
    pack_checkpoint,
    unpack_checkpoint,
)
from edgeprune.service.job_data import build_data, build_eval_data, task_name
from edgeprune.service.model_cache import WARM_SCORES, ModelCache, WarmScores
from edgeprune.storage import CircuitRecord, DatasetRepo
from edgeprune.v1 import common_pb2, job_pb2


@dataclass
class Hooks:
    """How a job talks to its worker."""

    progress: Callable[[job_pb2.JobProgress], None]
    checkpoint: Callable[[bytes], None]
    should_stop: Callable[[], bool]
    resume: bytes | None = None
    checkpoint_every: int = 0
    warning: Callable[[dict[str, Any]], None] = lambda fields: None  # JobWarning fields


@dataclass
class Outcome:
    """What a job produced. ``stopped``: it was asked to stop and checkpointed."""

    circuits: list[Circuit] = field(default_factory=list)
    targets: list[dict[str, Any]] = field(default_factory=list)  # stored size per circuit
    metrics: dict[str, float] = field(default_factory=dict)
    warnings: list[dict[str, Any]] = field(default_factory=list)  # JobWarning fields
    stopped: bool = False
    task: str = ""
    model: CircuitModel | None = None


# ------------------------------------------------------------------------------------ methods


def _pruner(model: CircuitModel, spec: job_pb2.JobSpec, ref: str) -> Callable[..., Any]:
    """`prune` on this process's model, or over ``data_parallel_workers`` spawned processes
    (one per GPU of the worker, or CPU processes under gloo) that load ``ref`` themselves."""
    workers = spec.data_parallel_workers
    if workers <= 1:
        return lambda train, config, **hooks: prune(model, train, config, **hooks)
    device_type = model.device.type
    model_spec = ModelSpec(ref, dtype=_dtype_name(model))

    def parallel(train: TaskDataset, config: PruneConfig, *, warm_scores: Any = None,
                 **hooks: Any) -> Any:  # each rank computes its own warm start
        return prune_data_parallel(model_spec, train, config, world_size=workers,
                                   device_type=device_type, **hooks)

    return parallel


def _edge_count(size: dict[str, Any], graph: Graph) -> int:
    """Edges a proto-form size asks for (an overshooting target counts as none)."""
    kwargs = translate.size_kwargs(size, graph.n_edges)
    kwargs.pop("edge_target", None)
    return requested_edges(graph, **kwargs) or 0


def _warning(warning: diagnostics.ResultWarning, size_index: int) -> dict[str, Any]:
    return {**warning.to_dict(), "size_index": size_index}


def run_edge_pruning(model: CircuitModel, train: TaskDataset, spec: job_pb2.JobSpec,
                     sizes: list[dict[str, Any]], hooks: Hooks, *, ref: str,
                     ) -> tuple[list[Circuit], list[dict[str, Any]], bool]:
    """(circuits in the order of ``sizes``, training warnings, stopped). One run trained at the
    sparsest size, every size cut from its masks: a sweep costs one warm start and one run (the
    same checkpoints whether the job runs in one process or data parallel)."""
    engine_state = None
    if hooks.resume is not None:
        _, _, engine_state = unpack_checkpoint(hooks.resume)
    counts = [_edge_count(size, model.graph) for size in sizes]
    trained = min(range(len(sizes)), key=lambda i: counts[i])
    config = translate.prune_config(spec, sizes[trained], model.graph.n_edges)
    key = WarmScores.key(ref, model, train, config)

    def run(resume: bytes | None) -> Any:
        return _pruner(model, spec, ref)(
            train, config,
            progress=lambda event: hooks.progress(translate.progress(event)),
            checkpoint_every=hooks.checkpoint_every,
            on_checkpoint=lambda data: hooks.checkpoint(pack_checkpoint(0, [], data)),
            resume=resume,
            should_stop=hooks.should_stop,
            warm_scores=WARM_SCORES.get(key) if config.warm_start is not None else None,
        )

    try:
        try:
            result = run(engine_state)
        except InvalidArgument as err:  # the engine cannot read its own state back
            if engine_state is None or err.field != "resume":
                raise
            checkpoint_discarded(hooks.warning, err)
            result = run(None)
    except Stopped:  # during the activation cache or the warm start: nothing to keep yet
        return [], [], True
    if result.warm_scores is not None:
        WARM_SCORES.put(key, result.warm_scores)
    if result.stopped:
        return [], [], True
    circuits = [result.circuit if i == trained else result.circuit_at(model, edge_count=counts[i])
                for i in range(len(sizes))]
    # the engine judged the training; every circuit's size is judged by the caller
    warnings = [_warning(w, trained) for w in result.warnings
                if w.reason == diagnostics.TARGET_NOT_REACHED]
    return circuits, warnings, False


def run_attribution(model: CircuitModel, train: TaskDataset, spec: job_pb2.JobSpec,
                    sizes: list[dict[str, Any]], hooks: Hooks) -> list[Circuit]:
    method = translate.METHODS[spec.method]
    settings = translate.attribution_kwargs(spec)
    hooks.progress(translate.phase("attribute"))
    if method == "acdc":
        return [attribution.acdc(model, train, **settings).circuit]
    scores = attribution.attribute(
        model, train, method, should_stop=hooks.should_stop,
        progress=lambda done, total: hooks.progress(translate.phase("attribute", done, total)),
        **settings)
    circuits = []
    for size in sizes:
        kwargs = translate.size_kwargs(size, model.graph.n_edges)
        kwargs.pop("edge_target", None)
        if not kwargs:
            kwargs = {"edge_sparsity": 1.0}
        circuits.append(attribution.scored_circuit(model, train, scores, method=method,
                                                   settings={"ablation": settings["ablation"]},
                                                   **kwargs))
    return circuits


def _clean_metrics(values: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe metrics (PostgreSQL's JSON has no NaN): non-finite numbers become None."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in values.items()}


def evaluate_circuits(model: CircuitModel, circuits: list[Circuit], data: TaskDataset,
                      ablation: str, batch_size: int) -> dict[str, float]:
    """Evaluate every circuit in place; returns the job summary (first circuit + CPR/CMD)."""
    results = evaluate_many(model, circuits, data, ablation=ablation, batch_size=batch_size)
    for circuit, values in zip(circuits, results, strict=True):
        circuit.metrics = _clean_metrics(values)
    summary = translate.float_map({k: v for k, v in circuits[0].metrics.items() if v is not None})
    if len(circuits) > 1:
        fractions = [float(r.get("edge_fraction", 0.0)) for r in results]
        faith = [float(r.get("faithfulness", math.nan)) for r in results]
        summary["cpr"] = cpr(fractions, faith)
        summary["cmd"] = cmd(fractions, faith)
    return summary


def check_memory(model: CircuitModel, data: TaskDataset,
                 spec: job_pb2.JobSpec | job_pb2.EvaluationSpec, budget: int | None) -> None:
    """ResourceExhausted (with the estimate) when a pruning step (an evaluation batch, for an
    EvaluationSpec) on the tokenised data cannot fit ``budget`` bytes (the API checked a lower
    bound of the sequence length already)."""
    if budget is None:
        return
    n_tokens, n_positions = data.clean_ids.shape[1], data.positions.shape[1]  # T, P
    check_fits(memory_check.estimate(
        spec, ModelShape.from_model(model), seq_len=n_tokens, n_examples=len(data),
        answer_positions=n_positions, dtype=_dtype_name(model),
        on_gpu=model.device.type == "cuda"), budget)


def _dtype_name(model: CircuitModel) -> str:
    return str(model.dtype).removeprefix("torch.")


@contextlib.contextmanager
def _loaded(ref: str, models: ModelCache, device: str, dtype: int,
            hooks: Hooks) -> Iterator[CircuitModel]:
    """The job's model from the cache; it keeps no step buffers once the job is done."""
    hooks.progress(translate.phase("load_model"))
    with tracing.span("model.load", **{"model.ref": ref, "model.device": device}):
        model = models.get(ref, device, translate.dtype_name(dtype, device))
    try:
        yield model
    finally:
        model.release_workspace()


def run_discovery(spec: job_pb2.JobSpec, ref: str, models: ModelCache, datasets: DatasetRepo,
                  device: str, hooks: Hooks, *, memory_budget: int | None = None) -> Outcome:
    with _loaded(ref, models, device, spec.dtype, hooks) as model:
        return _discover(model, spec, datasets, hooks, ref=ref, memory_budget=memory_budget)


def _discover(model: CircuitModel, spec: job_pb2.JobSpec, datasets: DatasetRepo, hooks: Hooks,
              *, ref: str, memory_budget: int | None) -> Outcome:
    hooks.progress(translate.phase("prepare_data"))
    train, held_out = build_data(spec.data, model.tokenizer, datasets, seed=spec.seed,
                                 all_positions=spec.positions == common_pb2.POSITION_MODE_ALL)
    check_memory(model, train, spec, memory_budget)
    sizes = [translate.size_to_dict(s) for s in spec.sizes]
    try:
        if spec.method == common_pb2.METHOD_EDGE_PRUNING:
            circuits, warnings, stopped = run_edge_pruning(model, train, spec, sizes, hooks, ref=ref)
            if stopped:
                return Outcome(stopped=True)
        else:
            circuits = run_attribution(model, train, spec, sizes, hooks)
            warnings = []
    except Stopped:
        return Outcome(stopped=True)
    if hooks.should_stop():
        return Outcome(stopped=True)
    counts = [_edge_count(size, model.graph) for size in sizes]
    for i, circuit in enumerate(circuits):
        requested = counts[i] if i < len(counts) and counts[i] else None
        warnings += [_warning(w, i) for w in diagnostics.size_warnings(circuit.edge_count, requested)]
    for warning in warnings:
        hooks.warning(warning)
    hooks.progress(translate.phase("evaluate"))
    summary = evaluate_circuits(model, circuits, held_out, translate.ABLATIONS[spec.ablation],
                                spec.batch_size)
    for i, circuit in enumerate(circuits):  # judged on held-out data
        for warning in diagnostics.held_out_warnings(circuit.metrics):
            warnings.append(_warning(warning, i))
            hooks.warning(warnings[-1])
    targets = sizes if len(sizes) == len(circuits) else [{} for _ in circuits]
    return Outcome(circuits=circuits, targets=targets, metrics=summary, warnings=warnings,
                   task=task_name(spec.data), model=model)


def run_evaluation(spec: job_pb2.EvaluationSpec, record: CircuitRecord, ref: str,
                   models: ModelCache, datasets: DatasetRepo, device: str, hooks: Hooks, *,
                   memory_budget: int | None = None) -> Outcome:
    with _loaded(ref, models, device, spec.dtype, hooks) as model:
        hooks.progress(translate.phase("prepare_data"))
        held_out = build_eval_data(spec.data, model.tokenizer, datasets)
        check_memory(model, held_out, spec, memory_budget)
        hooks.progress(translate.phase("evaluate"))
        results = evaluate_many(model, [translate.circuit_from_record(record)], held_out,
                                ablation=translate.evaluation_ablation(spec, record),
                                batch_size=spec.batch_size)
        return Outcome(metrics=translate.float_map(_clean_metrics(results[0])), model=model)


def masks_blob(model: CircuitModel, circuit: Circuit) -> bytes:
    """The circuit's binary edge mask [E] and node mask [W] (graph order) as safetensors."""
    graph = model.graph
    tensors = {"edge_mask": circuit.edge_mask(graph).float().contiguous(),
               "node_mask": circuit.node_mask(graph).float().contiguous()}
    return save_safetensors(tensors, metadata={"model": circuit.model, "method": circuit.method,
                                               "edges_total": str(graph.n_edges)})


__all__ = ["Hooks", "Outcome", "masks_blob", "run_discovery", "run_evaluation"]
