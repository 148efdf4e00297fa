"""One job on the engine: a stored JobSpec / EvaluationSpec in, circuits and metrics out.

The worker supplies `Hooks` (progress, checkpoint, stop) and stores what `run_discovery` /
`run_evaluation` return. Edge Pruning trains one run, at the sparsest requested size, and cuts
every requested size from its masks (the EAP-IG warm start keeps the edges below the trained
size in their attribution order); its checkpoint is a small container (``EPJOB1``): a JSON header
(the size index and circuits done, kept for checkpoints of earlier versions, which ran one run
per size), then the engine's own checkpoint bytes. No pickle anywhere: JSON and safetensors only.
Results that fall short of the request carry warnings (see ``engine/diagnostics.py``), sent to
the job's event stream as soon as they are known and stored with the result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from edgeprune.engine import attribution, defaults, diagnostics
from edgeprune.engine.circuit import Circuit, requested_edges
from edgeprune.engine.distributed import ModelSpec, prune_data_parallel
from edgeprune.engine.errors import InvalidArgument, Stopped
from edgeprune.engine.graph import Graph
from edgeprune.engine.loading import load_model
from edgeprune.engine.masked import CircuitModel
from edgeprune.engine.memory import ModelShape, check_fits
from edgeprune.engine.metrics import evaluate_many
from edgeprune.engine.prune import PhaseProgress, ProgressEvent, PruneConfig, prune
from edgeprune.engine.sweep import cmd, cpr
from edgeprune.engine.tasks import Example, TaskDataset, build_task, from_examples
from edgeprune.service import memory_check
from edgeprune.service.converters import METHOD_NAMES, float_map, size_to_dict
from edgeprune.storage import CircuitRecord, DatasetRepo
from edgeprune.storage import errors as storage_errors
from edgeprune.v1 import common_pb2, job_pb2

CHECKPOINT_MAGIC = b"EPJOB1\n"
CHECKPOINT_CORRUPT = "CHECKPOINT_CORRUPT"  # JobWarning.reason: the attempt restarted from step 0
ABLATIONS = {common_pb2.ABLATION_CORRUPTED: "corrupted", common_pb2.ABLATION_ZERO: "zero",
             common_pb2.ABLATION_MEAN: "mean"}
LOSSES = {common_pb2.LOSS_KL: "kl", common_pb2.LOSS_LOGIT_DIFF: "logit_diff"}
DTYPES = {common_pb2.DTYPE_FLOAT32: torch.float32, common_pb2.DTYPE_BFLOAT16: torch.bfloat16,
          common_pb2.DTYPE_FLOAT16: torch.float16}
MODEL_CACHE_SIZE = 2
WARM_SCORES_CACHE_SIZE = 16  # EAP-IG warm starts kept per worker: [E] floats each


@dataclass
class Hooks:
    """How a job talks to its worker."""

    progress: Callable[[dict[str, Any]], None]  # JobProgress fields
    checkpoint: Callable[[bytes], None]
    should_stop: Callable[[], bool]
    resume: bytes | None = None
    checkpoint_every: int = 0
    warning: Callable[[dict[str, Any]], None] = lambda fields: None  # JobWarning fields


@dataclass
class Outcome:
    """What a job produced. ``stopped``: it was asked to stop and checkpointed."""

    circuits: list[Circuit] = field(default_factory=list)
    targets: list[dict[str, Any]] = field(default_factory=list)  # proto-form size per circuit
    metrics: dict[str, float] = field(default_factory=dict)
    warnings: list[dict[str, Any]] = field(default_factory=list)  # JobWarning fields
    stopped: bool = False
    task: str = ""
    model: CircuitModel | None = None


class ModelCache:
    """Models loaded in this worker process, least recently used dropped first."""

    def __init__(self, size: int = MODEL_CACHE_SIZE,
                 on_load: Callable[[str, float], None] | None = None) -> None:
        self.size = size
        self.on_load = on_load  # (ref, seconds) after each load
        self.models: OrderedDict[tuple[str, str, torch.dtype], CircuitModel] = OrderedDict()

    def get(self, ref: str, device: str, dtype: torch.dtype) -> CircuitModel:
        key = (ref, device, dtype)
        if key in self.models:
            self.models.move_to_end(key)
            return self.models[key]
        start = time.perf_counter()
        model = load_model(ref, device=device, dtype=dtype)
        if self.on_load is not None:
            self.on_load(ref, time.perf_counter() - start)
        self.models[key] = model
        while len(self.models) > self.size:
            self.models.popitem(last=False)
        return model


class WarmScores:
    """EAP-IG warm-start scores computed in this worker process, least recently used dropped
    first: a job on the same model, data and settings as an earlier one (a sweep resubmitted,
    another size) starts without recomputing them."""

    def __init__(self, size: int = WARM_SCORES_CACHE_SIZE) -> None:
        self.size = size
        self.scores: OrderedDict[tuple[Any, ...], torch.Tensor] = OrderedDict()

    @staticmethod
    def key(ref: str, model: CircuitModel, train: TaskDataset, config: PruneConfig
            ) -> tuple[Any, ...]:
        return (ref, str(model.device), model.dtype, train.content_hash, config.ablation,
                config.warm_start_ig_steps, config.batch_size)

    def get(self, key: tuple[Any, ...]) -> torch.Tensor | None:
        if key in self.scores:
            self.scores.move_to_end(key)
            return self.scores[key]
        return None

    def put(self, key: tuple[Any, ...], scores: torch.Tensor) -> None:
        self.scores[key] = scores
        self.scores.move_to_end(key)
        while len(self.scores) > self.size:
            self.scores.popitem(last=False)


WARM_SCORES = WarmScores()


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def resolve_dtype(dtype: int, device: str) -> torch.dtype:
    if dtype in DTYPES:
        return DTYPES[dtype]
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


# --------------------------------------------------------------------------------------- data


def _examples(data: job_pb2.DataSpec, datasets: DatasetRepo) -> tuple[str, list[Example]]:
    """(dataset name, examples) of an uploaded dataset or inline examples."""
    if data.WhichOneof("source") == "dataset":
        dataset_id = data.dataset.removeprefix("datasets/")
        rows = [row for batch in datasets.iter_examples(dataset_id) for row in batch]
        return data.dataset, [Example(**row) for row in rows]
    return "custom", [Example(clean=e.clean, corrupted=e.corrupted, target=e.target or None,
                              distractor=e.distractor or None) for e in data.examples.examples]


def build_data(data: job_pb2.DataSpec, model: CircuitModel, datasets: DatasetRepo, *,
               seed: int, all_positions: bool) -> tuple[TaskDataset, TaskDataset]:
    """(train, eval) datasets. Built-in tasks use their validation split for eval; uploaded and
    inline examples are split by ``eval_fraction`` (eval = train when too few examples)."""
    tokenizer = model.tokenizer
    if data.WhichOneof("source") == "task":
        task = data.task
        n_eval = max(1, round(task.example_count * data.eval_fraction))
        train = build_task(task.name, tokenizer, n=task.example_count, seed=task.seed,
                           split="train")
        return train, build_task(task.name, tokenizer, n=n_eval, seed=task.seed, split="validation")
    name, examples = _examples(data, datasets)
    # Tokenise and validate all examples at once, so errors name their index in the request.
    full = from_examples(examples, tokenizer, name=name,
                         all_positions=all_positions or data.examples.all_positions)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = round(len(examples) * data.eval_fraction) if len(examples) >= 2 else 0
    if n_eval == 0:
        return full, full
    train = full.subset(sorted(order[n_eval:]))
    return train, dataclasses.replace(full.subset(sorted(order[:n_eval])), split="validation")


def build_eval_data(data: job_pb2.DataSpec, model: CircuitModel,
                    datasets: DatasetRepo) -> TaskDataset:
    """Every example of the data (a built-in task's validation split)."""
    if data.WhichOneof("source") == "task":
        return build_task(data.task.name, model.tokenizer, n=data.task.example_count,
                          seed=data.task.seed, split="validation")
    name, examples = _examples(data, datasets)
    return from_examples(examples, model.tokenizer, name=name, split="validation",
                         all_positions=data.examples.all_positions)


def task_name(data: job_pb2.DataSpec) -> str:
    source = data.WhichOneof("source")
    if source == "task":
        return data.task.name
    return data.dataset if source == "dataset" else "custom"


# ---------------------------------------------------------------------------------- checkpoint


def pack_checkpoint(size_index: int, done: list[Circuit], engine_state: bytes) -> bytes:
    header = json.dumps({"size_index": size_index,
                         "done": [c.to_dict() for c in done]}).encode()
    return CHECKPOINT_MAGIC + struct.pack("<Q", len(header)) + header + engine_state


def unpack_checkpoint(data: bytes) -> tuple[int, list[Circuit], bytes | None]:
    """Inverse of `pack_checkpoint`; InvalidArgument (field "checkpoint") for anything else."""
    if not data.startswith(CHECKPOINT_MAGIC):
        raise InvalidArgument("the job's checkpoint is not an edgeprune job checkpoint",
                              field="checkpoint")
    offset = len(CHECKPOINT_MAGIC)
    try:
        (length,) = struct.unpack_from("<Q", data, offset)
        header = json.loads(data[offset + 8: offset + 8 + length])
        done = [Circuit.from_dict(c) for c in header["done"]]
        size_index = int(header["size_index"])
    except (struct.error, ValueError, KeyError, TypeError) as err:
        raise InvalidArgument(f"the job's checkpoint header is unreadable: {err}",
                              field="checkpoint") from err
    return size_index, done, data[offset + 8 + length:] or None


def load_checkpoint(fetch: Callable[[], bytes],
                    warning: Callable[[dict[str, Any]], None]) -> bytes | None:
    """The job's stored checkpoint from ``fetch()``, or None when it cannot be used: its bytes
    fail their hash, it is gone, or it is no job checkpoint. The attempt then starts again from
    step 0 and ``warning`` says so: losing the steps done is better than failing the job for
    good. An unreachable database is no verdict on the checkpoint and propagates."""
    try:
        data = fetch()
        unpack_checkpoint(data)
    except (storage_errors.IntegrityError, storage_errors.NotFound, InvalidArgument) as err:
        _checkpoint_discarded(warning, err)
        return None
    return data


def _checkpoint_discarded(warning: Callable[[dict[str, Any]], None], err: Exception) -> None:
    warning({"reason": CHECKPOINT_CORRUPT, "size_index": 0,
             "message": f"the stored checkpoint cannot be used ({err}); "
                        "this attempt starts again from step 0"})


# ------------------------------------------------------------------------------------ methods


def _size_kwargs(size: dict[str, Any], n_edges_total: int) -> dict[str, Any]:
    """Proto-form size -> engine keywords (n_edges / sparsity / edge_target)."""
    if "edge_count" in size:
        return {"n_edges": min(int(size["edge_count"]), n_edges_total)}
    if "edge_fraction" in size:
        return {"n_edges": max(1, round(float(size["edge_fraction"]) * n_edges_total))}
    sparsity = float(size.get("edge_sparsity", 0.0))
    if sparsity > 1.0:  # an overshooting Lagrangian target: the masks decide the size
        return {"edge_target": sparsity}
    return {"sparsity": sparsity}


def prune_config(spec: job_pb2.JobSpec, size: dict[str, Any], n_edges_total: int) -> PruneConfig:
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
        node_target=ep.node_sparsity if ep.HasField("node_sparsity") else 0.5,
        loss=LOSSES.get(spec.loss, "kl"),
        ablation=ABLATIONS[spec.ablation],
        seed=spec.seed,
        warm_start=None if ep.warm_start == job_pb2.WARM_START_NONE else "eap_ig",
        warm_start_ig_steps=ep.warm_start_ig_steps or defaults.WARM_START_IG_STEPS,
        activation_checkpointing=ep.activation_checkpointing,
        **_size_kwargs(size, n_edges_total),
    )


def _progress_fields(event: ProgressEvent | PhaseProgress) -> dict[str, Any]:
    if isinstance(event, PhaseProgress):
        return {"phase": event.phase, "step": event.step, "total_steps": event.total_steps}
    remaining = event.total_steps - event.step
    return {
        "phase": "prune",
        "step": event.step,
        "total_steps": event.total_steps,
        "loss": event.loss,
        "loss_name": event.loss_name,
        "task_loss": event.task_loss,
        **({"kl": event.task_loss} if event.loss_name == "kl" else {}),
        "sparsity_loss": event.sparsity_loss,
        "expected_edge_sparsity": event.expected_sparsity,
        "expected_node_sparsity": event.node_sparsity or 0.0,
        "target_edge_sparsity": event.target,
        "lambdas": list(event.lambdas.values()),
        "steps_per_second": event.steps_per_s,
        "eta_seconds": remaining / event.steps_per_s if event.steps_per_s > 0 else 0.0,
    }


def _pruner(model: CircuitModel, spec: job_pb2.JobSpec, ref: str) -> Callable[..., Any]:
    """`prune` on this process's model, or over ``data_parallel_workers`` spawned processes
    (one per GPU of the worker, or CPU processes under gloo) that load ``ref`` themselves."""
    workers = spec.data_parallel_workers
    if workers <= 1:
        return lambda train, config, **hooks: prune(model, train, config, **hooks)
    device_type = model.device.type
    model_spec = ModelSpec(ref, dtype=str(model.dtype).removeprefix("torch."))

    def parallel(train: TaskDataset, config: PruneConfig, *, warm_scores: Any = None,
                 **hooks: Any) -> Any:  # each rank computes its own warm start
        return prune_data_parallel(model_spec, train, config, world_size=workers,
                                   device_type=device_type, **hooks)

    return parallel


def _edge_count(size: dict[str, Any], graph: Graph) -> int:
    """Edges a proto-form size asks for (an overshooting target counts as none)."""
    kwargs = _size_kwargs(size, graph.n_edges)
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
    config = prune_config(spec, sizes[trained], model.graph.n_edges)
    key = WarmScores.key(ref, model, train, config)

    def run(resume: bytes | None) -> Any:
        return _pruner(model, spec, ref)(
            train, config,
            progress=lambda event: hooks.progress(_progress_fields(event)),
            checkpoint_every=hooks.checkpoint_every,
            on_checkpoint=lambda data: hooks.checkpoint(pack_checkpoint(0, [], data)),
            resume=resume,
            should_stop=hooks.should_stop,
            warm_scores=WARM_SCORES.get(key) if config.warm_start == "eap_ig" else None,
        )

    try:
        try:
            result = run(engine_state)
        except InvalidArgument as err:  # the engine cannot read its own state back
            if engine_state is None or err.field != "resume":
                raise
            _checkpoint_discarded(hooks.warning, err)
            result = run(None)
    except Stopped:  # during the activation cache or the warm start: nothing to keep yet
        return [], [], True
    if result.warm_scores is not None:
        WARM_SCORES.put(key, result.warm_scores)
    if result.stopped:
        return [], [], True
    circuits = [result.circuit if i == trained else result.circuit_at(model, n_edges=counts[i])
                for i in range(len(sizes))]
    # the engine judged the training; every circuit's size is judged by the caller
    warnings = [_warning(w, trained) for w in result.warnings
                if w.reason == diagnostics.TARGET_NOT_REACHED]
    return circuits, warnings, False


def run_attribution(model: CircuitModel, train: TaskDataset, spec: job_pb2.JobSpec,
                    sizes: list[dict[str, Any]], hooks: Hooks) -> list[Circuit]:
    method = METHOD_NAMES[spec.method]
    ablation = ABLATIONS[spec.ablation]
    if method == "acdc":
        hooks.progress({"phase": "attribute", "step": 0, "total_steps": 0})
        threshold = spec.attribution.acdc_threshold or 0.01
        result = attribution.acdc(model, train, threshold=threshold, ablation=ablation,
                                  batch_size=spec.batch_size)
        return [result.circuit]
    hooks.progress({"phase": "attribute", "step": 0, "total_steps": 0})
    scores = attribution.attribute(
        model, train, method, ablation=ablation, ig_steps=spec.attribution.ig_steps or 5,
        batch_size=spec.batch_size, should_stop=hooks.should_stop,
        progress=lambda done, total: hooks.progress(
            {"phase": "attribute", "step": done, "total_steps": total}))
    circuits = []
    for size in sizes:
        kwargs = _size_kwargs(size, model.graph.n_edges)
        kwargs.pop("edge_target", None)
        if not kwargs:
            kwargs = {"sparsity": 1.0}
        circuits.append(attribution.scored_circuit(model, train, scores, method=method,
                                                   settings={"ablation": ablation}, **kwargs))
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
    summary = float_map({k: v for k, v in circuits[0].metrics.items() if v is not None})
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
        answer_positions=n_positions, dtype=str(model.dtype).removeprefix("torch."),
        on_gpu=model.device.type == "cuda"), budget)


@contextlib.contextmanager
def _loaded(ref: str, models: ModelCache, device: str, dtype: int,
            hooks: Hooks) -> Iterator[CircuitModel]:
    """The job's model from the cache; it keeps no step buffers once the job is done."""
    hooks.progress({"phase": "load_model"})
    model = models.get(ref, device, resolve_dtype(dtype, device))
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
    hooks.progress({"phase": "prepare_data"})
    train, held_out = build_data(spec.data, model, datasets, seed=spec.seed,
                                 all_positions=spec.positions == common_pb2.POSITION_MODE_ALL)
    check_memory(model, train, spec, memory_budget)
    sizes = [size_to_dict(s) for s in spec.sizes]
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
        warnings += [_warning(w, i) for w in diagnostics.size_warnings(circuit.n_edges, requested)]
    for warning in warnings:
        hooks.warning(warning)
    hooks.progress({"phase": "evaluate"})
    summary = evaluate_circuits(model, circuits, held_out, ABLATIONS[spec.ablation],
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
        hooks.progress({"phase": "prepare_data"})
        held_out = build_eval_data(spec.data, model, datasets)
        check_memory(model, held_out, spec, memory_budget)
        circuit = Circuit(model=record.model, method=record.method,
                          edges=list(record.edges or []),
                          edge_scores=dict(record.edge_scores or {}),
                          nodes=list(record.nodes or []), n_edges_total=record.n_edges_total)
        ablation = ABLATIONS.get(spec.ablation) or record.settings.get("ablation", "corrupted")
        hooks.progress({"phase": "evaluate"})
        results = evaluate_many(model, [circuit], held_out, ablation=ablation,
                                batch_size=spec.batch_size)
        return Outcome(metrics=float_map(_clean_metrics(results[0])), model=model)


def masks_blob(model: CircuitModel, circuit: Circuit) -> bytes:
    """The circuit's binary edge mask [E] and node mask [W] (graph order) as safetensors."""
    graph = model.graph
    tensors = {"edge_mask": circuit.edge_mask(graph).float().contiguous(),
               "node_mask": circuit.node_mask(graph).float().contiguous()}
    return save_safetensors(tensors, metadata={"model": circuit.model, "method": circuit.method,
                                               "edges_total": str(graph.n_edges)})


__all__ = ["Hooks", "ModelCache", "Outcome", "masks_blob", "resolve_device", "run_discovery",
           "run_evaluation"]
