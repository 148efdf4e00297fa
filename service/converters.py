"""API responses built from storage records. Pure functions; nothing here touches gRPC or the DB.

What a stored value means to the engine (enum names, sizes, progress) is `translate`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2

from edgeprune.service.errors import status_of_job_error
from edgeprune.service.translate import (  # the kinds and STATES_BY_PROTO: for the handlers
    KIND_DISCOVERY,  # noqa: F401
    KIND_EVALUATION,  # noqa: F401
    METHODS_BY_NAME,
    STATES,
    STATES_BY_PROTO,  # noqa: F401
    float_map,
    jsonable,
    parse_spec,
    progress_from_payload,
    size_to_proto,
)
from edgeprune.storage import CircuitRecord, DatasetRecord, EventRecord, JobRecord, JobState
from edgeprune.v1 import circuit_pb2, common_pb2, dataset_pb2, job_pb2

EVENT_STATE = "state"
EVENT_PROGRESS = "progress"
EVENT_WARNING = "warning"
EVENT_CANCEL_REQUESTED = "cancel_requested"


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(jsonable(value))
    return out


# ------------------------------------------------------------------------------------ datasets


def dataset_to_proto(record: DatasetRecord) -> dataset_pb2.Dataset:
    return dataset_pb2.Dataset(
        name=f"datasets/{record.id}",
        display_name=record.display_name,
        example_count=record.example_count,
        size_bytes=record.size_bytes,
        content_sha256=record.content_hash,
        create_time=timestamp(record.created_at),
        labels={k: str(v) for k, v in record.labels.items()},
    )


# ---------------------------------------------------------------------------------------- jobs


def _summarise_data(data: job_pb2.DataSpec, *, keep_examples: bool) -> None:
    """Count inline examples (every view) and drop them unless kept; other sources stay as
    they are."""
    if data.WhichOneof("source") != "examples":
        return
    if data.examples.examples or not data.examples.example_count:
        data.examples.example_count = len(data.examples.examples)
    if not keep_examples:
        data.examples.ClearField("examples")


def warning_to_proto(payload: Mapping[str, Any],
                     circuits: list[str] | None = None) -> job_pb2.JobWarning:
    """A JobWarning; ``circuits`` (the result's circuit names) name the circuit it concerns."""
    index = int(payload.get("size_index", 0))
    circuit = circuits[index] if circuits and 0 <= index < len(circuits) else ""
    return job_pb2.JobWarning(reason=str(payload.get("reason", "")),
                              message=str(payload.get("message", "")), size_index=index,
                              circuit=circuit)


def result_to_proto(result: Mapping[str, Any]) -> job_pb2.JobResult:
    circuits = [f"circuits/{c}" for c in result.get("circuits", [])]
    return job_pb2.JobResult(
        circuits=circuits,
        metrics=float_map(result.get("metrics", {})),
        warnings=[warning_to_proto(w, circuits) for w in result.get("warnings", [])],
    )


def job_to_proto(record: JobRecord, *, full: bool = False) -> job_pb2.Job:
    """A Job message. BASIC leaves out inline examples (`data.examples.example_count` says
    how many there are), as does FULL for a record read without its spec bytes."""
    job = job_pb2.Job(
        name=f"jobs/{record.id}",
        state=STATES[record.state],
        priority=record.priority,
        labels={k: str(v) for k, v in record.labels.items()},
        create_time=timestamp(record.created_at),
        start_time=timestamp(record.started_at),
        end_time=timestamp(record.finished_at),
        attempt=record.attempt,
        cancel_requested=record.cancel_requested,
        last_event_sequence=record.last_event_sequence,
    )
    spec = parse_spec(record)
    _summarise_data(spec.data, keep_examples=full)
    if isinstance(spec, job_pb2.EvaluationSpec):
        job.type = job_pb2.JOB_TYPE_EVALUATION
        job.evaluation.CopyFrom(spec)
    else:
        job.type = job_pb2.JOB_TYPE_DISCOVERY
        job.spec.CopyFrom(spec)
    if record.progress:
        job.progress.CopyFrom(progress_from_payload(record.progress))
    if record.state == JobState.SUCCEEDED:
        job.result.CopyFrom(result_to_proto(record.result))
    if record.error is not None and record.state in (JobState.FAILED, JobState.CANCELLED):
        job.error.CopyFrom(status_of_job_error(record.error, record.error_reason))
    return job


def event_to_proto(event: EventRecord, job: JobRecord | None = None) -> job_pb2.JobEvent:
    """A JobEvent. ``job`` (the job as stored now) fills in the result or error of a final
    state change."""
    out = job_pb2.JobEvent(job=f"jobs/{event.job_id}", sequence=event.sequence,
                           time=timestamp(event.created_at))
    if event.kind == EVENT_PROGRESS:
        out.progress.CopyFrom(progress_from_payload(event.payload))
        return out
    if event.kind == EVENT_WARNING:
        out.warning.CopyFrom(warning_to_proto(event.payload))
        return out
    if event.kind == EVENT_CANCEL_REQUESTED:
        # Only a RUNNING job is flagged, and it stays RUNNING until its worker stops; the
        # CANCELLED state change follows. (Read as a state event it would say PENDING.)
        out.state_change.CopyFrom(job_pb2.StateChange(
            state=STATES[JobState.RUNNING], attempt=event.attempt, reason="cancel requested"))
        return out
    state = JobState(event.payload.get("state", "PENDING"))
    change = out.state_change
    change.state = STATES[state]
    change.attempt = int(event.payload.get("attempt", event.attempt))
    change.reason = str(event.payload.get("reason") or "")
    if job is not None and state == JobState.SUCCEEDED:
        change.result.CopyFrom(result_to_proto(job.result))
    if job is not None and state in (JobState.FAILED, JobState.CANCELLED) and job.error:
        change.error.CopyFrom(status_of_job_error(job.error, job.error_reason))
    return out


def is_final_event(event: EventRecord) -> bool:
    return event.kind == EVENT_STATE and JobState(event.payload.get("state", "PENDING")).final


# ------------------------------------------------------------------------------------ circuits


def circuit_to_proto(record: CircuitRecord, *, full: bool = False) -> circuit_pb2.Circuit:
    circuit = circuit_pb2.Circuit(
        name=f"circuits/{record.id}",
        job=f"jobs/{record.job_id}" if record.job_id else "",
        model=record.model,
        method=METHODS_BY_NAME.get(record.method, common_pb2.METHOD_UNSPECIFIED),
        task=record.task,
        dataset=f"datasets/{record.dataset_id}" if record.dataset_id else "",
        edge_count=record.edge_count,
        node_count=record.node_count,
        total_edge_count=record.total_edge_count,
        edge_sparsity=record.edge_sparsity,
        target=size_to_proto(record.target),
        metrics=float_map(record.metrics),
        create_time=timestamp(record.created_at),
    )
    if full:
        circuit.edges_omitted = record.edges is None  # too large for one reply
        scores = record.edge_scores or {}
        circuit.edges.extend(circuit_pb2.Edge(name=e, score=scores.get(e, 0.0))
                             for e in record.edges or [])
        circuit.nodes.extend(record.nodes or [])
        circuit.settings.CopyFrom(struct(record.settings))
        circuit.provenance.CopyFrom(struct(record.provenance))
    return circuit
