"""Job events: the durable source of every progress stream.

Sequence numbers are dense per job (1, 2, 3 ...) even under concurrent appends: each append
takes the next number by incrementing `jobs.last_event_sequence` in its own transaction,
which locks the job row (PostgreSQL) or the database (SQLite) until it commits.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from edgeprune.storage.db import Database
from edgeprune.storage.errors import InvalidArgument, NotFound
from edgeprune.storage.models import Job, JobEvent, utcnow
from edgeprune.storage.records import EventRecord

MAX_KIND_LENGTH = 32
MAX_EVENTS_PER_READ = 1000
MAX_IDS_PER_QUERY = 500  # job ids per IN list (SQLite caps a statement's parameters)


class EventRepo:
    """Append and replay job events; each method is one transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def append(self, job_id: str, kind: str, payload: Mapping[str, Any]) -> EventRecord:
        """Append an event (not fenced: for the service itself; workers use
        `Queue.report`). Raises NotFound."""
        with self.db.session() as session:
            return append_event(session, job_id, kind, payload)

    def after(self, job_id: str, seq: int = 0, *, limit: int = 100) -> list[EventRecord]:
        """Events with sequence number > seq, in order, at most `limit` (<= 1000).
        after(job, 0) replays from the start. Raises NotFound for an unknown job."""
        if not 0 < limit <= MAX_EVENTS_PER_READ:
            raise InvalidArgument(f"must be between 1 and {MAX_EVENTS_PER_READ}", field="limit")
        with self.db.session(write=False) as session:
            rows = session.scalars(
                select(JobEvent)
                .where(JobEvent.job_id == job_id, JobEvent.sequence > seq)
                .order_by(JobEvent.sequence)
                .limit(limit)
            ).all()
            if not rows and session.get(Job, job_id) is None:
                raise NotFound("job", job_id)
            return [event_record(row) for row in rows]

    def last_sequences(self, job_ids: Collection[str]) -> dict[str, int]:
        """The highest sequence number of each of these jobs (in as few queries as the
        number of ids allows); unknown ids are left out."""
        ids = sorted(set(job_ids))
        out: dict[str, int] = {}
        with self.db.session(write=False) as session:
            for start in range(0, len(ids), MAX_IDS_PER_QUERY):
                chunk = ids[start:start + MAX_IDS_PER_QUERY]
                rows = session.execute(
                    select(Job.id, Job.last_event_sequence).where(Job.id.in_(chunk)))
                out.update({job_id: seq for job_id, seq in rows})
        return out

    def after_many(self, cursors: Mapping[str, int], *, limit: int = 100) -> dict[str, list[EventRecord]]:
        """`after(job, seq, limit=limit)` for every (job, seq) of `cursors`, in one
        transaction; jobs without such events map to []."""
        if not 0 < limit <= MAX_EVENTS_PER_READ:
            raise InvalidArgument(f"must be between 1 and {MAX_EVENTS_PER_READ}", field="limit")
        with self.db.session(write=False) as session:
            return {job_id: [event_record(row) for row in session.scalars(
                select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.sequence > seq)
                .order_by(JobEvent.sequence).limit(limit))] for job_id, seq in cursors.items()}

    def last_sequence(self, job_id: str) -> int:
        """The highest sequence number so far (0 when none). Raises NotFound."""
        with self.db.session(write=False) as session:
            seq = session.execute(
                select(Job.last_event_sequence).where(Job.id == job_id)
            ).scalar_one_or_none()
        if seq is None:
            raise NotFound("job", job_id)
        return seq


def append_event(
    session: Session, job_id: str, kind: str, payload: Mapping[str, Any], attempt: int | None = None
) -> EventRecord:
    """Append an event inside the caller's transaction. `attempt` None = the job's current."""
    if not kind or len(kind) > MAX_KIND_LENGTH:
        raise InvalidArgument(f"event kind must be 1-{MAX_KIND_LENGTH} characters", field="kind")
    if not isinstance(payload, Mapping):
        raise InvalidArgument("event payload must be a JSON object", field="payload")
    row = session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(last_event_sequence=Job.last_event_sequence + 1)
        .returning(Job.last_event_sequence, Job.attempt)
    ).first()
    if row is None:
        raise NotFound("job", job_id)
    event = JobEvent(
        job_id=job_id,
        sequence=row.last_event_sequence,
        kind=kind,
        payload=dict(payload),
        attempt=row.attempt if attempt is None else attempt,
        created_at=utcnow(),
    )
    session.add(event)
    session.flush()
    return event_record(event)


def event_record(row: JobEvent) -> EventRecord:
    return EventRecord(
        job_id=row.job_id,
        sequence=row.sequence,
        kind=row.kind,
        payload=dict(row.payload),
        attempt=row.attempt,
        created_at=row.created_at,
    )
