"""How the command line prints resources: aligned tables for people, JSON for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, TextIO

from google.protobuf import json_format
from google.protobuf.message import Message

from edgeprune.v1 import circuit_pb2, common_pb2, dataset_pb2, job_pb2

__all__ = [
    "CIRCUIT_COLUMNS",
    "DATASET_COLUMNS",
    "JOB_COLUMNS",
    "describe_circuit",
    "describe_dataset",
    "describe_event",
    "describe_job",
    "enum_name",
    "job_columns",
    "print_json",
    "print_pairs",
    "print_table",
    "to_dict",
]

Column = tuple[str, Callable[[Any], Any]]


def enum_name(enum: Any, value: int, prefix: str) -> str:
    """``JOB_STATE_RUNNING`` -> ``RUNNING``; unknown numbers print as numbers."""
    try:
        return str(enum.Name(value)).removeprefix(prefix)
    except ValueError:
        return str(value)


def _time(stamp: Any) -> str:
    if not stamp.seconds and not stamp.nanos:
        return "-"
    moment = datetime.fromtimestamp(stamp.seconds, tz=timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _metric(metrics: Any, key: str) -> str:
    return f"{metrics[key]:.4g}" if key in metrics else "-"


def _short(name: str) -> str:
    return name.split("/", 1)[-1]


def _job_progress(job: job_pb2.Job) -> str:
    p = job.progress
    if job.state == job_pb2.JOB_STATE_RUNNING and p.total_steps:
        return f"{p.phase or 'step'} {p.step}/{p.total_steps}"
    return p.phase or ""


def job_columns(circuit_models: Mapping[str, str] | None = None) -> list[Column]:
    """Columns of ``jobs list``. An evaluation job runs on its circuit's model, which the job
    does not carry: ``circuit_models`` maps circuit names to models ("-" where unknown); its
    METHOD names the circuit it evaluates."""
    models = circuit_models or {}

    def model(job: job_pb2.Job) -> str:
        return job.spec.model or models.get(job.evaluation.circuit) or "-"

    def method(job: job_pb2.Job) -> str:
        if job.evaluation.circuit:
            return f"EVALUATE {job.evaluation.circuit}"
        return enum_name(common_pb2.Method, job.spec.method, "METHOD_")

    return [
        ("JOB", lambda j: _short(j.name)),
        ("STATE", lambda j: enum_name(job_pb2.JobState, j.state, "JOB_STATE_")),
        ("MODEL", model),
        ("METHOD", method),
        ("PROGRESS", _job_progress),
        ("CIRCUITS", lambda j: len(j.result.circuits) or "-"),
        ("CREATED", lambda j: _time(j.create_time)),
    ]


JOB_COLUMNS: list[Column] = job_columns()

CIRCUIT_COLUMNS: list[Column] = [
    ("CIRCUIT", lambda c: _short(c.name)),
    ("MODEL", lambda c: c.model),
    ("TASK", lambda c: c.task),
    ("METHOD", lambda c: enum_name(common_pb2.Method, c.method, "METHOD_")),
    ("EDGES", lambda c: f"{c.edge_count}/{c.total_edge_count}"),
    ("SPARSITY", lambda c: f"{c.edge_sparsity:.2%}"),
    ("KL", lambda c: _metric(c.metrics, "kl")),
    ("FAITHFULNESS", lambda c: _metric(c.metrics, "faithfulness")),
    ("ACCURACY", lambda c: _metric(c.metrics, "accuracy")),
]

DATASET_COLUMNS: list[Column] = [
    ("DATASET", lambda d: _short(d.name)),
    ("NAME", lambda d: d.display_name),
    ("EXAMPLES", lambda d: d.example_count),
    ("BYTES", lambda d: d.size_bytes),
    ("SHA256", lambda d: d.content_sha256[:12]),
    ("CREATED", lambda d: _time(d.create_time)),
]


def print_table(
    rows: Iterable[Any], columns: Sequence[Column], *, out: TextIO | None = None, empty: str = ""
) -> int:
    """Print ``rows`` as an aligned table; returns the number of rows."""
    out = out or sys.stdout
    cells = [[str(get(row)) for _, get in columns] for row in rows]
    if not cells:
        if empty:
            print(empty, file=sys.stderr)
        return 0
    header = [title for title, _ in columns]
    widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header))]
    for line in [header, *cells]:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip(), file=out)
    return len(cells)


def to_dict(message: Message) -> dict[str, Any]:
    """A message as a JSON-ready dict (proto field names, enums as names, defaults kept)."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def print_json(value: Message | Iterable[Message] | dict[str, Any], *, out: TextIO | None = None) -> None:
    """Print a message, a list of messages or a dict as indented JSON."""
    if isinstance(value, Message):
        data: Any = to_dict(value)
    elif isinstance(value, dict):
        data = value
    else:
        data = [to_dict(m) for m in value]
    print(json.dumps(data, indent=2, sort_keys=False), file=out or sys.stdout)


def describe_event(event: job_pb2.JobEvent) -> str:
    """One line for a state change event (progress events are drawn by the bar)."""
    change = event.state_change
    text = f"{_short(event.job)}: {enum_name(job_pb2.JobState, change.state, 'JOB_STATE_')}"
    if change.attempt > 1:
        text += f" (attempt {change.attempt})"
    if change.reason:
        text += f" - {change.reason}"
    if change.error.message:
        text += f": {change.error.message}"
    return text


def describe_warning(warning: job_pb2.JobWarning) -> str:
    """One line for a warning about a job's result."""
    where = warning.circuit or f"size {warning.size_index + 1}"
    return f"warning ({where}) {warning.reason}: {warning.message}"


def describe_circuit(circuit: circuit_pb2.Circuit) -> list[tuple[str, str]]:
    """Key/value lines of ``circuits show``."""
    lines = [
        ("circuit", circuit.name),
        ("job", circuit.job),
        ("model", circuit.model),
        ("task", circuit.task + (f" ({circuit.dataset})" if circuit.dataset else "")),
        ("method", enum_name(common_pb2.Method, circuit.method, "METHOD_")),
        ("edges", f"{circuit.edge_count} of {circuit.total_edge_count} ({circuit.edge_sparsity:.2%} sparse)"),
        ("nodes", str(circuit.node_count)),
        ("created", _time(circuit.create_time)),
    ]
    lines += [(key, f"{value:.4g}") for key, value in sorted(circuit.metrics.items())]
    return lines


def describe_dataset(dataset: dataset_pb2.Dataset) -> list[tuple[str, str]]:
    """Key/value lines of ``datasets get``/``upload``."""
    return [
        ("dataset", dataset.name),
        ("name", dataset.display_name),
        ("examples", str(dataset.example_count)),
        ("bytes", str(dataset.size_bytes)),
        ("sha256", dataset.content_sha256),
    ]


def describe_job(job: job_pb2.Job) -> list[tuple[str, str]]:
    """Key/value lines of ``jobs get``."""
    lines = [
        ("job", job.name),
        ("state", enum_name(job_pb2.JobState, job.state, "JOB_STATE_")),
        ("attempt", str(job.attempt)),
        ("created", _time(job.create_time)),
        ("started", _time(job.start_time)),
        ("ended", _time(job.end_time)),
    ]
    if job.spec.model:
        lines += [
            ("model", job.spec.model),
            ("method", enum_name(common_pb2.Method, job.spec.method, "METHOD_")),
        ]
    if job.evaluation.circuit:
        lines.append(("evaluates", job.evaluation.circuit))
    if job.progress.phase:
        lines.append(("progress", _job_progress(job)))
    if job.cancel_requested:
        lines.append(("cancel", "requested"))
    lines += [("circuit", name) for name in job.result.circuits]
    lines += [(key, f"{value:.4g}") for key, value in sorted(job.result.metrics.items())]
    lines += [("warning", describe_warning(w).removeprefix("warning "))
              for w in job.result.warnings]
    if job.error.message:
        lines.append(("error", job.error.message))
    return lines


def print_pairs(pairs: Sequence[tuple[str, str]], *, out: TextIO | None = None) -> None:
    """Print ``key: value`` lines with aligned values."""
    width = max((len(k) for k, _ in pairs), default=0)
    for key, value in pairs:
        print(f"{key + ':':<{width + 1}} {value}", file=out or sys.stdout)
