"""Jobs as resources: create (idempotent per owner + request_id), get, list, cancel.

The worker side of a job's life (claim, heartbeat, complete ...) is in `queue.py`.

A job's spec can carry megabytes of inline examples, twice (the protobuf bytes and their JSON).
`get` and `list` therefore never read `spec_json` whole: the database hands back a copy without
the inline examples (their number in ``data.examples.example_count``), and the spec bytes are
read only for a full record, and in a full list only while they fit the caller's byte budget.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Collection, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Text, cast, exc, func, literal, select, tuple_, type_coerce
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session, defer

from edgeprune.storage import lifecycle
from edgeprune.storage.db import Database
from edgeprune.storage.errors import AlreadyExists, InvalidArgument, NotFound, QueueFull
from edgeprune.storage.events import append_event
from edgeprune.storage.models import Job, JsonValue, utcnow
from edgeprune.storage.paging import decode_token, encode_token, page_size_or_default
from edgeprune.storage.records import JobRecord, JobState, NewJob, Page
from edgeprune.storage.sqlutil import dialect_name

MAX_NAME_LENGTH = 255
# Any constant works: every admission takes the same PostgreSQL advisory lock.
_ADMISSION_LOCK_KEY = 0x6564_6761  # "edga"
# A full record's size beyond its spec bytes and JSON fields (ids, times, enums, framing).
RECORD_OVERHEAD_BYTES = 1024


class JobRepo:
    """Create, read, list and cancel jobs; each method is one transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, new: NewJob, *, max_pending: int | None = None,
               max_pending_per_owner: int | None = None,
               trace: Mapping[str, str] | None = None) -> JobRecord:
        """Store a PENDING job (and its first "state" event).

        With a request_id: the same (owner, request_id) and the same spec returns the job
        created the first time, even under concurrent duplicates; a different spec raises
        AlreadyExists. With `max_pending`: QueueFull when that many jobs are PENDING already;
        the count and the insert are one serialised step, so concurrent creates never admit
        more than the cap (a repeated request_id still returns its job).
        `max_pending_per_owner` caps the PENDING jobs of `new.owner` the same way.
        `trace`: the W3C trace context (``traceparent``) of the submission, stored with the
        job's first event, so the worker's spans join the submitter's trace.
        """
        _validate(new)
        try:
            with self.db.session() as session:
                existing = _find_request(session, new)
                if existing is not None:
                    return existing
                if max_pending is not None or max_pending_per_owner is not None:
                    _admit(session, max_pending, new.owner, max_pending_per_owner)
                now = utcnow()
                job = Job(
                    id=uuid.uuid4().hex,
                    kind=new.kind,
                    spec=bytes(new.spec),
                    spec_json=dict(new.spec_json),
                    state=JobState.PENDING,
                    priority=new.priority,
                    labels=dict(new.labels),
                    owner=new.owner,
                    request_id=new.request_id,
                    attempt=0,
                    cancel_requested=False,
                    created_at=now,
                    updated_at=now,
                    progress={},
                    result={},
                    last_event_sequence=0,
                )
                session.add(job)
                session.flush()
                first: dict[str, Any] = {"state": JobState.PENDING.value}
                if trace:
                    first["trace"] = dict(trace)
                append_event(session, job.id, "state", first)
                return job_record(job)
        except exc.IntegrityError:
            # A concurrent duplicate (same owner and request_id) committed first.
            with self.db.session(write=False) as session:
                existing = _find_request(session, new)
            if existing is None:
                raise
            return existing

    def get(self, job_id: str, *, full: bool = True, max_bytes: int | None = None) -> JobRecord:
        """The job; `spec_json` without inline examples (see the module docstring).

        full=False, or a full record larger than `max_bytes` (see `record_size`), leaves
        `spec` empty. Raises NotFound.
        """
        with self.db.session(write=False) as session:
            rows = session.execute(_read_query(self.db.dialect).where(Job.id == job_id)).all()
            if not rows:
                raise NotFound("job", job_id)
            return _with_specs(session, rows, full=full, max_bytes=max_bytes)[0]

    def list(
        self,
        *,
        states: Collection[JobState] | None = None,
        owner: str | None = None,
        kind: str | None = None,
        model: str | None = None,
        labels: Mapping[str, str] | None = None,
        page_size: int = 50,
        page_token: str | None = None,
        full: bool = False,
        max_bytes: int | None = None,
    ) -> Page[JobRecord]:
        """Newest first; keyset pagination (the token is opaque and bound to the filters).
        `model` matches the spec's model, `labels` the jobs carrying all of them.

        Records as `get` returns them. full=True reads the spec bytes too; with `max_bytes`
        the page then ends early (with a token) before the record that would take the page's
        `record_size` total past it; a first record larger than that alone comes without its
        spec bytes, so every page makes progress.
        """
        size = page_size_or_default(page_size)
        state_values = sorted(JobState(s).value for s in states) if states else None
        filters = {"states": state_values, "owner": owner, "kind": kind, "model": model,
                   "labels": dict(sorted((labels or {}).items())) or None}
        after = decode_token(page_token, filters)
        query = _read_query(self.db.dialect).order_by(Job.created_at.desc(), Job.id.desc()).limit(size + 1)
        if state_values:
            query = query.where(Job.state.in_([JobState(v) for v in state_values]))
        if owner is not None:
            query = query.where(Job.owner == owner)
        if kind is not None:
            query = query.where(Job.kind == kind)
        if model is not None:
            query = query.where(Job.spec_json["model"].as_string() == model)
        for key, value in (labels or {}).items():
            query = query.where(Job.labels[key].as_string() == value)
        if after is not None:
            created, job_id = _parse_job_key(after)
            query = query.where(tuple_(Job.created_at, Job.id) < tuple_(created, job_id))
        with self.db.session(write=False) as session:
            rows = session.execute(query).all()
            items = _with_specs(session, rows[:size], full=full, max_bytes=max_bytes)
        token = None
        if len(rows) > len(items):
            last = items[-1]
            token = encode_token([last.created_at.isoformat(), last.id], filters)
        return Page(items, token)

    def request_cancel(self, job_id: str, *, reason: str = "cancelled by request") -> JobRecord:
        """Best-effort cancel: a PENDING job becomes CANCELLED at once; a RUNNING job is
        flagged and its worker sees it at its next heartbeat; a final job is returned as is.
        Raises NotFound.
        """
        with self.db.session() as session:
            job = get_job(session, job_id, for_update=True)
            now = utcnow()
            if job.state == JobState.PENDING:
                job.state = JobState.CANCELLED
                job.finished_at = job.updated_at = now
                job.error, job.error_reason = reason, "CANCELLED"
                session.flush()
                append_event(session, job.id, "state",
                             {"state": JobState.CANCELLED.value, "reason": reason})
            elif job.state == JobState.RUNNING and not job.cancel_requested:
                job.cancel_requested = True
                job.updated_at = now
                session.flush()
                append_event(session, job.id, "cancel_requested", {"reason": reason})
            return job_record(job)

    def delete(self, job_id: str) -> None:
        """Delete a final job with its events; its circuits stay, unlinked (see
        `lifecycle.py`). Raises NotFound, or Conflict while the job is PENDING or RUNNING."""
        with self.db.session() as session:
            lifecycle.delete_job(session, job_id)

    def delete_finished_before(self, cutoff: datetime, *, limit: int = 1000) -> int:
        """Delete up to `limit` final jobs that ended before `cutoff`; returns how many."""
        with self.db.session() as session:
            return lifecycle.delete_jobs_finished_before(session, cutoff, limit=limit)


def get_job(session: Session, job_id: str, *, for_update: bool = False) -> Job:
    """The job row (locked FOR UPDATE on PostgreSQL when asked). Raises NotFound."""
    query = select(Job).where(Job.id == job_id)
    if for_update:
        query = query.with_for_update()
    job = session.scalars(query).one_or_none()
    if job is None:
        raise NotFound("job", job_id)
    return job


def job_record(job: Job, *, spec: bytes | None = None,
               spec_json: dict[str, Any] | None = None) -> JobRecord:
    """The record of a job row; `spec` / `spec_json` replace columns the query left out."""
    return JobRecord(
        id=job.id,
        kind=job.kind,
        spec=bytes(job.spec) if spec is None else spec,
        spec_json=dict(job.spec_json) if spec_json is None else spec_json,
        state=JobState(job.state),
        priority=job.priority,
        labels=dict(job.labels),
        owner=job.owner,
        request_id=job.request_id,
        attempt=job.attempt,
        cancel_requested=job.cancel_requested,
        lease_owner=job.lease_owner,
        lease_expires_at=job.lease_expires_at,
        heartbeat_at=job.heartbeat_at,
        created_at=job.created_at,
        updated_at=job.updated_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        progress=dict(job.progress),
        checkpoint_blob=job.checkpoint_blob,
        result=dict(job.result),
        error=job.error,
        error_reason=job.error_reason,
        last_event_sequence=job.last_event_sequence,
    )


def record_size(record: JobRecord, spec_bytes: int) -> int:
    """An upper estimate of a full record's size in a reply: its spec bytes, the text of its
    JSON fields and a fixed overhead."""
    texts = (record.labels, record.progress, record.result)
    return (spec_bytes + sum(len(json.dumps(t)) for t in texts) + len(record.error or "")
            + RECORD_OVERHEAD_BYTES)


_EXAMPLES_PATH = ("data", "examples", "examples")


def _spec_summary(dialect: str) -> tuple[ColumnElement[Any], ColumnElement[Any]]:
    """(spec_json without its inline examples, their number or NULL), computed by the
    database so the examples never reach this process."""
    if dialect == "postgresql":
        path = cast(literal("{" + ",".join(_EXAMPLES_PATH) + "}"), postgresql.ARRAY(Text))
        summary = Job.spec_json.op("#-")(path)
        count = func.jsonb_array_length(Job.spec_json.op("#>")(path))
    else:
        json_path = "$." + ".".join(_EXAMPLES_PATH)
        summary = func.json_remove(Job.spec_json, json_path)
        count = func.json_array_length(Job.spec_json, json_path)
    return type_coerce(summary, JsonValue).label("spec_summary"), count.label("example_count")


def _read_query(dialect: str) -> Any:
    """SELECT of (Job, spec_bytes, spec_summary, example_count): the job row without its
    spec and spec_json (either raises if touched), the spec's size and its summary."""
    return select(Job, func.length(Job.spec).label("spec_bytes"),
                  *_spec_summary(dialect)).options(defer(Job.spec, raiseload=True),
                                                   defer(Job.spec_json, raiseload=True))


def _with_specs(session: Session, rows: list[Any], *, full: bool,
                max_bytes: int | None) -> list[JobRecord]:
    """Records of (Job, spec_bytes, spec_summary, example_count) rows. full=True reads the
    spec bytes of the leading rows whose sizes fit `max_bytes` together and drops the rows
    after them; a first row too large alone stays a summary."""
    records = [job_record(job, spec=b"", spec_json=_summary_json(summary, count))
               for job, _, summary, count in rows]
    if not full:
        return records
    budget = max_bytes
    if budget is not None:
        total, kept = 0, 0
        for record, (_, spec_bytes, _, _) in zip(records, rows, strict=True):
            total += record_size(record, spec_bytes or 0)
            if total > budget:
                break
            kept += 1
        if kept == 0:
            return records[:1]  # too large for any reply: its summary
        records = records[:kept]
    specs = {job_id: spec for job_id, spec in session.execute(
        select(Job.id, Job.spec).where(Job.id.in_([r.id for r in records])))}
    return [dataclasses.replace(r, spec=bytes(specs[r.id])) for r in records]


def _summary_json(summary: Any, count: int | None) -> dict[str, Any]:
    out = dict(summary or {})
    if count is not None:
        data = dict(out.get("data") or {})
        data["examples"] = {**(data.get("examples") or {}), "example_count": count}
        out["data"] = data
    return out


def _admit(session: Session, max_pending: int | None, owner: str,
           max_per_owner: int | None) -> None:
    """QueueFull unless fewer than `max_pending` jobs are PENDING (and fewer than
    `max_per_owner` of `owner`'s). Admissions run one at a time (a transaction-scoped
    advisory lock on PostgreSQL; SQLite's write transactions are already serial), so the counts
    cannot go stale before this transaction commits."""
    if dialect_name(session) == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(_ADMISSION_LOCK_KEY)))
    pending = select(func.count()).select_from(Job).where(Job.state == JobState.PENDING)
    if max_pending is not None and (session.scalar(pending) or 0) >= max_pending:
        raise QueueFull(max_pending)
    if max_per_owner is not None and (
            session.scalar(pending.where(Job.owner == owner)) or 0) >= max_per_owner:
        raise QueueFull(max_per_owner, owner)


def _find_request(session: Session, new: NewJob) -> JobRecord | None:
    """The job an earlier identical request created, if any; AlreadyExists if it differs."""
    if new.request_id is None:
        return None
    job = session.scalars(
        select(Job).where(Job.owner == new.owner, Job.request_id == new.request_id)
    ).one_or_none()
    if job is None:
        return None
    if bytes(job.spec) != bytes(new.spec) or job.kind != new.kind:
        raise AlreadyExists(
            "job", new.request_id,
            f"request_id {new.request_id!r} was already used for a different job ({job.id})",
        )
    return job_record(job)


def _validate(new: NewJob) -> None:
    if not isinstance(new.spec, (bytes, bytearray)):
        raise InvalidArgument("must be the serialized protobuf (bytes)", field="spec")
    if not isinstance(new.spec_json, Mapping):
        raise InvalidArgument("must be a JSON object", field="spec_json")
    if not isinstance(new.labels, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in new.labels.items()
    ):
        raise InvalidArgument("must map strings to strings", field="labels")
    if isinstance(new.priority, bool) or not isinstance(new.priority, int):
        raise InvalidArgument("must be an integer", field="priority")
    if new.request_id is not None and not 0 < len(new.request_id) <= MAX_NAME_LENGTH:
        raise InvalidArgument(f"must be 1-{MAX_NAME_LENGTH} characters", field="request_id")
    if len(new.owner) > MAX_NAME_LENGTH:
        raise InvalidArgument(f"longer than {MAX_NAME_LENGTH} characters", field="owner")
    if len(new.kind) > 64:
        raise InvalidArgument("longer than 64 characters", field="kind")


def _parse_job_key(key: list[Any]) -> tuple[Any, str]:
    from datetime import datetime

    try:
        created, job_id = key
        return datetime.fromisoformat(created), str(job_id)
    except (TypeError, ValueError) as err:
        raise InvalidArgument("malformed page token", field="page_token") from err
