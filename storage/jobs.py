"""Jobs as resources: create (idempotent per caller + request_id), get, list, cancel.

The worker side of a job's life (claim, heartbeat, complete ...) is in `queue.py`.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Mapping
from typing import Any

from sqlalchemy import exc, select, tuple_
from sqlalchemy.orm import Session

from edgeprune.storage.db import Database
from edgeprune.storage.errors import AlreadyExists, InvalidArgument, NotFound
from edgeprune.storage.events import append_event
from edgeprune.storage.models import Job, utcnow
from edgeprune.storage.paging import decode_token, encode_token, page_size_or_default
from edgeprune.storage.records import JobRecord, JobState, NewJob, Page

MAX_NAME_LENGTH = 255


class JobRepo:
    """Create, read, list and cancel jobs; each method is one transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, new: NewJob) -> JobRecord:
        """Store a PENDING job (and its first "state" event).

        With a request_id: the same (caller, request_id) and the same spec returns the job
        created the first time, even under concurrent duplicates; a different spec raises
        AlreadyExists.
        """
        _validate(new)
        try:
            with self.db.session() as session:
                existing = _find_request(session, new)
                if existing is not None:
                    return existing
                now = utcnow()
                job = Job(
                    id=uuid.uuid4().hex,
                    kind=new.kind,
                    display_name=new.display_name,
                    spec=bytes(new.spec),
                    spec_json=dict(new.spec_json),
                    state=JobState.PENDING,
                    priority=new.priority,
                    labels=dict(new.labels),
                    caller=new.caller,
                    request_id=new.request_id,
                    attempt=0,
                    cancel_requested=False,
                    created_at=now,
                    updated_at=now,
                    progress={},
                    result={},
                    last_event_seq=0,
                )
                session.add(job)
                session.flush()
                append_event(session, job.id, "state", {"state": JobState.PENDING.value})
                return job_record(job)
        except exc.IntegrityError:
            # A concurrent duplicate (same caller and request_id) committed first.
            with self.db.session(write=False) as session:
                existing = _find_request(session, new)
            if existing is None:
                raise
            return existing

    def get(self, job_id: str) -> JobRecord:
        """Raises NotFound."""
        with self.db.session(write=False) as session:
            return job_record(get_job(session, job_id))

    def list(
        self,
        *,
        states: Collection[JobState] | None = None,
        caller: str | None = None,
        kind: str | None = None,
        page_size: int = 50,
        page_token: str | None = None,
    ) -> Page[JobRecord]:
        """Newest first; keyset pagination (the token is opaque and bound to the filters)."""
        size = page_size_or_default(page_size)
        state_values = sorted(JobState(s).value for s in states) if states else None
        filters = {"states": state_values, "caller": caller, "kind": kind}
        after = decode_token(page_token, filters)
        query = select(Job).order_by(Job.created_at.desc(), Job.id.desc()).limit(size + 1)
        if state_values:
            query = query.where(Job.state.in_([JobState(v) for v in state_values]))
        if caller is not None:
            query = query.where(Job.caller == caller)
        if kind is not None:
            query = query.where(Job.kind == kind)
        if after is not None:
            created, job_id = _parse_job_key(after)
            query = query.where(tuple_(Job.created_at, Job.id) < tuple_(created, job_id))
        with self.db.session(write=False) as session:
            rows = list(session.scalars(query))
        items = [job_record(row) for row in rows[:size]]
        token = None
        if len(rows) > size:
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


def get_job(session: Session, job_id: str, *, for_update: bool = False) -> Job:
    """The job row (locked FOR UPDATE on PostgreSQL when asked). Raises NotFound."""
    query = select(Job).where(Job.id == job_id)
    if for_update:
        query = query.with_for_update()
    job = session.scalars(query).one_or_none()
    if job is None:
        raise NotFound("job", job_id)
    return job


def job_record(job: Job) -> JobRecord:
    return JobRecord(
        id=job.id,
        kind=job.kind,
        display_name=job.display_name,
        spec=bytes(job.spec),
        spec_json=dict(job.spec_json),
        state=JobState(job.state),
        priority=job.priority,
        labels=dict(job.labels),
        caller=job.caller,
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
        last_event_seq=job.last_event_seq,
    )


def _find_request(session: Session, new: NewJob) -> JobRecord | None:
    """The job an earlier identical request created, if any; AlreadyExists if it differs."""
    if new.request_id is None:
        return None
    job = session.scalars(
        select(Job).where(Job.caller == new.caller, Job.request_id == new.request_id)
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
        raise InvalidArgument("spec", "must be the serialized protobuf (bytes)")
    if not isinstance(new.spec_json, Mapping):
        raise InvalidArgument("spec_json", "must be a JSON object")
    if not isinstance(new.labels, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in new.labels.items()
    ):
        raise InvalidArgument("labels", "must map strings to strings")
    if isinstance(new.priority, bool) or not isinstance(new.priority, int):
        raise InvalidArgument("priority", "must be an integer")
    if new.request_id is not None and not 0 < len(new.request_id) <= MAX_NAME_LENGTH:
        raise InvalidArgument("request_id", f"must be 1-{MAX_NAME_LENGTH} characters")
    for field_name in ("caller", "display_name"):
        if len(getattr(new, field_name)) > MAX_NAME_LENGTH:
            raise InvalidArgument(field_name, f"longer than {MAX_NAME_LENGTH} characters")
    if len(new.kind) > 64:
        raise InvalidArgument("kind", "longer than 64 characters")


def _parse_job_key(key: list[Any]) -> tuple[Any, str]:
    from datetime import datetime

    try:
        created, job_id = key
        return datetime.fromisoformat(created), str(job_id)
    except (TypeError, ValueError) as err:
        raise InvalidArgument("page_token", "malformed page token") from err
