"""Checks of every request field against the proto contract and the server's limits.

A `Violations` collector gathers every problem of a request (field path + description) so one
call reports them all: INVALID_ARGUMENT when any field is malformed, else RESOURCE_EXHAUSTED when
a value is well-formed but over a configured limit. `normalize_job_spec` also fills every default
in (the server's `default_*` settings and the engine's defaults), so the stored spec is exactly
what the worker runs. Names, tasks and the engine's limits come from ``edgeprune.engine.contract``.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from edgeprune.engine import defaults
from edgeprune.engine.contract import (
    BUILTIN,
    BUILTIN_TASKS,
    MAX_ACDC_THRESHOLD,
    MAX_EDGE_SPARSITY,
    MAX_EVAL_FRACTION,
    MAX_IG_STEPS,
    MAX_LEARNING_RATE,
    MAX_SEED,
    TRACR_TASK_PREFIX,
)
from edgeprune.engine.task_params import param_errors, param_field
from edgeprune.service.config import Config
from edgeprune.service.errors import InvalidArgument, ResourceExhausted
from edgeprune.service.translate import (
    WARM_STARTS_BY_NAME,
    fill_method_defaults,
)
from edgeprune.storage.limits import MAX_INTEGER, MAX_NAME_LENGTH, text_problem
from edgeprune.v1 import common_pb2, job_pb2

RESOURCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
LABEL_KEY = re.compile(r"[a-z][a-z0-9_-]{0,62}")
MAX_LABEL_VALUE = 63
MAX_REQUEST_ID = 128
MAX_PRIORITY = 100
MAX_TEXT = 4096
MAX_DISPLAY_NAME = MAX_NAME_LENGTH  # the column's width
MAX_PARAM_PROBLEMS = 16  # task params reported one by one (a map may hold any number of keys)


class Violations:
    """Collects (field, description) pairs; `raise_if_any` raises the right error."""

    def __init__(self) -> None:
        self.invalid: list[tuple[str, str]] = []
        self.over_limit: list[tuple[str, str]] = []

    def bad(self, field: str, description: str) -> None:
        self.invalid.append((field, description))

    def limit(self, field: str, value: float, maximum: float) -> None:
        self.over_limit.append((field, f"{value} exceeds the server's limit of {maximum}"))

    def raise_if_any(self) -> None:
        if self.invalid:
            field, description = self.invalid[0]
            error = InvalidArgument(description, field=field)
            error.violations = list(self.invalid)
            if len(self.invalid) > 1:
                error.message += f" (and {len(self.invalid) - 1} more)"
            raise error
        if self.over_limit:
            field, description = self.over_limit[0]
            raise ResourceExhausted(f"{field}: {description}", reason="LIMIT_EXCEEDED",
                                    violations=self.over_limit)

    def count(self, field: str, value: int, maximum: int, *, minimum: int = 0) -> None:
        """An integer in [minimum, maximum]: below -> invalid, above -> over a limit."""
        if value < minimum:
            self.bad(field, f"must be at least {minimum}, got {value}")
        elif value > maximum:
            self.limit(field, value, maximum)

    def number(self, field: str, value: float, low: float, high: float, *,
               low_open: bool = False) -> None:
        """A finite float in [low, high] (or (low, high])."""
        if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
            bracket = "(" if low_open else "["
            self.bad(field, f"must be in {bracket}{low}, {high}], got {value}")

    def enum(self, field: str, value: int, enum: Any, *, required: bool = False) -> None:
        if value not in enum.values():
            self.bad(field, f"unknown value {value}")
        elif required and value == 0:
            self.bad(field, "is required")


def parse_name(name: str, collection: str, *, field: str = "name") -> str:
    """``"jobs/abc"`` -> ``"abc"``; INVALID_ARGUMENT naming ``field`` otherwise."""
    prefix = f"{collection}/"
    if not name:
        raise InvalidArgument(f"is required (`{collection}/{{id}}`)", field=field)
    if not name.startswith(prefix) or not RESOURCE_ID.fullmatch(name[len(prefix):]):
        raise InvalidArgument(f"{name!r} is not a `{collection}/{{id}}` name", field=field)
    return name[len(prefix):]


def parse_circuit_name(name: str, *, field: str = "name") -> str:
    """``"circuits/42"`` -> ``"42"``: a decimal id beyond what the id column holds is malformed
    (INVALID_ARGUMENT); any other unknown id is left to the lookup (NOT_FOUND)."""
    circuit_id = parse_name(name, "circuits", field=field)
    if circuit_id.isdecimal() and int(circuit_id) > MAX_INTEGER:
        raise InvalidArgument(f"circuit ids are at most {MAX_INTEGER}, got {circuit_id}",
                              field=field)
    return circuit_id


def text_violations(message: Message, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(field path, problem) of every string in ``message``, at any depth, that the database
    cannot hold (a NUL character): checked for every request, whatever its RPC, so no such text
    reaches storage and SQLite answers as PostgreSQL must."""
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            for key, item in value.items():
                item_path = f"{path}[{key!r}]"
                if isinstance(key, str) and (problem := text_problem(key)):
                    yield item_path, f"keys {problem}"
                yield from _value_violations(value_field, item, item_path)
        elif field.is_repeated:
            for i, item in enumerate(value):
                yield from _value_violations(field, item, f"{path}[{i}]")
        else:
            yield from _value_violations(field, value, path)


def _value_violations(field: FieldDescriptor, value: Any, path: str) -> Iterator[tuple[str, str]]:
    if field.type == FieldDescriptor.TYPE_STRING and (problem := text_problem(value)):
        yield path, problem
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        yield from text_violations(value, f"{path}.")


def check_labels(v: Violations, field: str, labels: Mapping[str, str], config: Config) -> None:
    if len(labels) > config.limits.max_labels:
        v.limit(field, len(labels), config.limits.max_labels)
    for key, value in labels.items():
        if not LABEL_KEY.fullmatch(key):
            v.bad(f"{field}[{key!r}]", "keys are lowercase letters, digits, _ and -, 1-63 long")
        if len(value) > MAX_LABEL_VALUE:
            v.bad(f"{field}[{key!r}]", f"values are at most {MAX_LABEL_VALUE} characters")


def check_common(v: Violations, *, priority: int, labels: Mapping[str, str], request_id: str,
                 config: Config) -> None:
    """Fields every job-creating request has."""
    if not -MAX_PRIORITY <= priority <= MAX_PRIORITY:
        v.bad("priority", f"must be in [-{MAX_PRIORITY}, {MAX_PRIORITY}], got {priority}")
    check_labels(v, "labels", labels, config)
    if len(request_id) > MAX_REQUEST_ID or not request_id.isprintable():
        v.bad("request_id", f"must be printable and at most {MAX_REQUEST_ID} characters")


def check_page(v: Violations, page_size: int, config: Config) -> int:
    """The page size to use (0 -> the default; above the limit -> the limit, AIP-158)."""
    if page_size < 0:
        v.bad("page_size", f"must not be negative, got {page_size}")
    if page_size == 0:
        return config.default_page_size
    return min(page_size, config.limits.max_page_size)


def check_example(v: Violations, field: str, ex: common_pb2.Example) -> None:
    for name in ("clean", "corrupted"):
        text = getattr(ex, name)
        if not text:
            v.bad(f"{field}.{name}", "is required")
        elif len(text) > MAX_TEXT:
            v.bad(f"{field}.{name}", f"is longer than {MAX_TEXT} characters")
    for name in ("target", "distractor"):
        if len(getattr(ex, name)) > MAX_TEXT:
            v.bad(f"{field}.{name}", f"is longer than {MAX_TEXT} characters")
    if ex.multi_token and not ex.target:
        v.bad(f"{field}.target", "is required with multi_token")


def check_task_params(v: Violations, field: str, task: job_pb2.TaskSource) -> None:
    """``params`` against the task's schema (an unknown task's are not judged): each unknown
    key or bad value is reported on ``{field}.params['key']``, as the generator would reject it."""
    info = BUILTIN.get(task.name)
    if info is None and not task.name.startswith(TRACR_TASK_PREFIX):
        return
    schema = info.params if info is not None else ()  # tracr_* tasks take none
    problems = param_errors(schema, task.params, task=task.name)
    for key, problem in itertools.islice(problems, MAX_PARAM_PROBLEMS):
        v.bad(f"{field}.{param_field(key)}", problem)


def check_data(v: Violations, field: str, data: job_pb2.DataSpec, config: Config,
               *, model_ref: str | None) -> None:
    """A DataSpec: exactly one source, within the limits. Defaults are filled in place."""
    source = data.WhichOneof("source")
    if source is None:
        v.bad(f"{field}.source", "one of dataset, task or examples is required")
    elif source == "dataset":
        try:
            parse_name(data.dataset, "datasets", field=f"{field}.dataset")
        except InvalidArgument as err:
            v.bad(err.field, err.violations[0][1])
    elif source == "task":
        task = data.task
        tracr = (model_ref or "").startswith("tracr:")
        if not task.name:
            v.bad(f"{field}.task.name", "is required")
        elif task.name not in BUILTIN_TASKS and not task.name.startswith(TRACR_TASK_PREFIX):
            v.bad(f"{field}.task.name",
                  f"unknown task {task.name!r}; built-in tasks: {', '.join(BUILTIN_TASKS)}")
        elif task.name.startswith(TRACR_TASK_PREFIX) != tracr and model_ref is not None:
            v.bad(f"{field}.task.name", "tracr_* tasks need a tracr model and vice versa")
        v.count(f"{field}.task.example_count", task.example_count, config.limits.max_examples)
        if task.example_count == 0:
            task.example_count = config.default_examples
        check_task_params(v, f"{field}.task", task)
    else:
        examples = data.examples.examples
        if not examples:
            v.bad(f"{field}.examples.examples", "at least one example is required")
        elif len(examples) > config.limits.max_inline_examples:
            v.limit(f"{field}.examples.examples", len(examples), config.limits.max_inline_examples)
        for i, ex in enumerate(examples[: config.limits.max_inline_examples]):
            check_example(v, f"{field}.examples.examples[{i}]", ex)
            if ex.multi_token and data.examples.all_positions:
                v.bad(f"{field}.examples.examples[{i}].multi_token",
                      "a multi-token answer cannot be scored at every position (all_positions)")
    v.number(f"{field}.eval_fraction", data.eval_fraction, 0.0, MAX_EVAL_FRACTION)
    if data.eval_fraction == 0:
        data.eval_fraction = defaults.EVAL_FRACTION


def check_sizes(v: Violations, spec: job_pb2.JobSpec, config: Config) -> None:
    if len(spec.sizes) > config.limits.max_sizes:
        v.limit("spec.sizes", len(spec.sizes), config.limits.max_sizes)
    top = MAX_EDGE_SPARSITY if spec.method == common_pb2.METHOD_EDGE_PRUNING else 1.0
    for i, size in enumerate(spec.sizes):
        field = f"spec.sizes[{i}]"
        kind = size.WhichOneof("size")
        if kind is None:
            v.bad(field, "one of edge_sparsity, edge_count or edge_fraction is required")
        elif kind == "edge_sparsity":
            v.number(f"{field}.edge_sparsity", size.edge_sparsity, 0.0, top)
        elif kind == "edge_count":
            if size.edge_count < 1:
                v.bad(f"{field}.edge_count", f"must be at least 1, got {size.edge_count}")
        else:
            v.number(f"{field}.edge_fraction", size.edge_fraction, 0.0, 1.0, low_open=True)
    if not spec.sizes:
        spec.sizes.add(edge_sparsity=config.default_edge_sparsity)


def check_edge_pruning(v: Violations, spec: job_pb2.JobSpec, config: Config) -> None:
    ep = spec.edge_pruning
    is_ep = spec.method == common_pb2.METHOD_EDGE_PRUNING
    if not is_ep:
        if spec.HasField("edge_pruning"):
            v.bad("spec.edge_pruning", "only applies to METHOD_EDGE_PRUNING")
        if spec.loss == common_pb2.LOSS_LOGIT_DIFF:
            v.bad("spec.loss", "LOSS_LOGIT_DIFF only applies to METHOD_EDGE_PRUNING")
        return
    v.count("spec.edge_pruning.steps", ep.steps, config.limits.max_steps)
    if ep.steps == 0:
        ep.steps = min(config.default_steps, config.limits.max_steps)
    if ep.warmup_steps < 0 or ep.warmup_steps > ep.steps:
        v.bad("spec.edge_pruning.warmup_steps", f"must be in [0, steps={ep.steps}]")
    if ep.warmup_steps == 0:
        ep.warmup_steps = defaults.target_warmup_steps(ep.steps)  # as PruneConfig's default
    for name, default in (("mask_learning_rate", defaults.MASK_LEARNING_RATE),
                          ("lambda_learning_rate", defaults.LAMBDA_LEARNING_RATE)):
        value = getattr(ep, name)
        v.number(f"spec.edge_pruning.{name}", value, 0.0, MAX_LEARNING_RATE)
        if value == 0:
            setattr(ep, name, default)
    if ep.HasField("node_sparsity"):
        v.number("spec.edge_pruning.node_sparsity", ep.node_sparsity, 0.0, MAX_EDGE_SPARSITY)
    if not ep.HasField("node_masks"):
        ep.node_masks = defaults.NODE_MASKS
    v.enum("spec.edge_pruning.warm_start", ep.warm_start, job_pb2.WarmStart)
    if ep.warm_start == job_pb2.WARM_START_UNSPECIFIED:
        ep.warm_start = WARM_STARTS_BY_NAME[defaults.WARM_START]
    if not 0 <= ep.warm_start_ig_steps <= MAX_IG_STEPS:
        v.bad("spec.edge_pruning.warm_start_ig_steps",
              f"must be in [0, {MAX_IG_STEPS}], got {ep.warm_start_ig_steps}")


def check_data_parallel(v: Violations, spec: job_pb2.JobSpec, config: Config) -> None:
    """``data_parallel_workers``: Edge Pruning only, within the server's limit and the batch."""
    field, workers = "spec.data_parallel_workers", spec.data_parallel_workers
    limit = config.limits.max_data_parallel
    if workers < 0:
        v.bad(field, f"must not be negative, got {workers}")
    elif workers > limit:
        v.bad(field, f"{workers} exceeds the server's max_data_parallel of {limit}")
    elif workers > 1 and spec.method != common_pb2.METHOD_EDGE_PRUNING:
        v.bad(field, "only METHOD_EDGE_PRUNING runs data parallel")
    elif workers > spec.batch_size:
        v.bad(field, f"{workers} processes cannot share a batch of {spec.batch_size}")


def check_attribution(v: Violations, spec: job_pb2.JobSpec) -> None:
    att = spec.attribution
    if spec.method == common_pb2.METHOD_EDGE_PRUNING and spec.HasField("attribution"):
        v.bad("spec.attribution", "does not apply to METHOD_EDGE_PRUNING")
    if not 0 <= att.ig_steps <= MAX_IG_STEPS:
        v.bad("spec.attribution.ig_steps", f"must be in [0, {MAX_IG_STEPS}], got {att.ig_steps}")
    v.number("spec.attribution.acdc_threshold", att.acdc_threshold, 0.0, MAX_ACDC_THRESHOLD)


def normalize_job_spec(spec: job_pb2.JobSpec, config: Config, v: Violations) -> None:
    """Check a discovery JobSpec (fields are reported as ``spec.*``) and fill defaults in."""
    model_ref = config.models.get(spec.model)
    if not spec.model:
        v.bad("spec.model", "is required")
    elif model_ref is None:
        v.bad("spec.model", f"{spec.model!r} is not on the server's allow-list "
                            f"({', '.join(sorted(config.models))})")
    v.enum("spec.method", spec.method, common_pb2.Method, required=True)
    for name, enum in (("ablation", common_pb2.Ablation), ("loss", common_pb2.Loss),
                       ("positions", common_pb2.PositionMode), ("dtype", common_pb2.Dtype)):
        v.enum(f"spec.{name}", getattr(spec, name), enum)
    if not spec.HasField("data"):
        v.bad("spec.data", "is required")
    else:
        check_data(v, "spec.data", spec.data, config, model_ref=model_ref)
    check_sizes(v, spec, config)
    v.count("spec.batch_size", spec.batch_size, config.limits.max_batch_size)
    if spec.batch_size == 0:
        spec.batch_size = config.default_batch_size
    # The engine derives torch seeds from it: a larger one would fail the job on the worker.
    v.number("spec.seed", spec.seed, -MAX_SEED, MAX_SEED)
    check_edge_pruning(v, spec, config)
    check_data_parallel(v, spec, config)
    check_attribution(v, spec)
    # Zero is "unset" in proto3 (an ACDC threshold of exactly 0 cannot be asked for): the
    # ablation, the loss, warm-start and IG points and the threshold get their defaults.
    fill_method_defaults(spec)


def normalize_evaluation(spec: job_pb2.EvaluationSpec, config: Config, v: Violations) -> str:
    """Check an EvaluationSpec (``evaluation.*``); returns the circuit id."""
    circuit_id = ""
    try:
        circuit_id = parse_circuit_name(spec.circuit, field="evaluation.circuit")
    except InvalidArgument as err:
        v.bad(err.field, err.violations[0][1])
    if not spec.HasField("data"):
        v.bad("evaluation.data", "is required")
    else:
        check_data(v, "evaluation.data", spec.data, config, model_ref=None)
    v.enum("evaluation.ablation", spec.ablation, common_pb2.Ablation)
    v.enum("evaluation.dtype", spec.dtype, common_pb2.Dtype)
    v.count("evaluation.batch_size", spec.batch_size, config.limits.max_batch_size)
    if spec.batch_size == 0:
        spec.batch_size = config.default_batch_size
    return circuit_id
