"""The job queue, worker side: claim, lease, heartbeat, fencing, finish.

claim() takes the next PENDING job by priority then age (PostgreSQL: SELECT ... FOR UPDATE
SKIP LOCKED; SQLite: inside BEGIN IMMEDIATE), moves it to RUNNING, bumps its `attempt` and
sets a lease. The attempt is the fencing token: every later write names it, and the write
is rejected (LeaseLost) unless the job is still RUNNING under that attempt and worker. A
worker that stops heartbeating loses its lease; `reclaim_expired` (also run by claim)
puts its job back to PENDING (or FAILED after `max_attempts`), and the next claim resumes
from the job's last checkpoint. `complete` stores the circuits and SUCCEEDED in one
transaction. Each state change appends a "state" event in the same transaction.

Every lease time (claim, heartbeat, expiry, the timestamps of leaving RUNNING) is read from
`Database.now` inside the transaction that writes it: on PostgreSQL the database server's
clock, so a worker whose own clock runs behind or ahead neither loses its job early nor keeps
a dead worker's job too long.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Select, func, select, update
from sqlalchemy.orm import Session

from edgeprune.storage.blobs import drop_if_unreferenced, put_blob
from edgeprune.storage.circuits import insert_circuits
from edgeprune.storage.db import Database
from edgeprune.storage.errors import InvalidArgument, LeaseLost
from edgeprune.storage.events import append_event
from edgeprune.storage.jobs import job_record
from edgeprune.storage.models import Job, utcnow
from edgeprune.storage.records import (
    CircuitRecord,
    Claim,
    EventRecord,
    JobRecord,
    JobState,
    NewCircuit,
)

DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_RECLAIM_INTERVAL_S = 1.0
CHECKPOINT_MEDIA_TYPE = "application/x-edgeprune-checkpoint"


class Queue:
    """Worker-side operations on jobs. Thread-safe; one instance per process is enough."""

    def __init__(
        self,
        db: Database,
        *,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        reclaim_interval_s: float = DEFAULT_RECLAIM_INTERVAL_S,
        on_reclaim: Callable[[str, JobState], None] | None = None,
    ) -> None:
        """max_attempts: claims a job may use before an expired lease fails it.
        reclaim_interval_s: claim() looks for expired leases at most this often.
        on_reclaim: called with (job id, new state) for each expired lease, once committed."""
        if max_attempts < 1:
            raise InvalidArgument("must be at least 1", field="max_attempts")
        self.db = db
        self.max_attempts = max_attempts
        self.reclaim_interval_s = reclaim_interval_s
        self.on_reclaim = on_reclaim
        self._next_reclaim = 0.0  # time.monotonic() of the next reclaim check

    def claim(
        self, worker_id: str, lease_s: float, *, kinds: Sequence[str] | None = None
    ) -> Claim | None:
        """Reclaim expired leases (every reclaim_interval_s), then take the next PENDING
        job (optionally only of these kinds). Returns None when there is none."""
        if not worker_id:
            raise InvalidArgument("must not be empty", field="worker_id")
        _check_lease(lease_s)
        if time.monotonic() >= self._next_reclaim:
            self._next_reclaim = time.monotonic() + self.reclaim_interval_s
            self.reclaim_expired()
        query = (
            select(Job)
            .where(Job.state == JobState.PENDING)
            .order_by(Job.priority.desc(), Job.created_at, Job.id)
            .limit(1)
        )
        if kinds is not None:
            query = query.where(Job.kind.in_(list(kinds)))
        if self.db.dialect == "postgresql":
            query = query.with_for_update(skip_locked=True)
        with self.db.session() as session:
            job = session.scalars(query).one_or_none()
            if job is None:
                return None
            now = self.db.now(session)
            job.state = JobState.RUNNING
            job.attempt += 1
            job.lease_owner = worker_id
            job.lease_expires_at = now + timedelta(seconds=lease_s)
            job.heartbeat_at = job.updated_at = now
            job.started_at = job.started_at or now
            session.flush()
            append_event(session, job.id, "state",
                         {"state": JobState.RUNNING.value, "worker": worker_id})
            return Claim(job_record(job), job.attempt, worker_id, lease_s, job.lease_expires_at)

    def heartbeat(self, claim: Claim, *, progress: Mapping[str, Any] | None = None) -> bool:
        """Extend the lease by claim.lease_s (optionally update the progress summary).
        Returns True when cancellation was requested. Raises LeaseLost."""
        with self.db.session() as session:
            now = self.db.now(session)
            values: dict[str, Any] = {
                "lease_expires_at": now + timedelta(seconds=claim.lease_s),
                "heartbeat_at": now,
            }
            if progress is not None:
                values["progress"] = dict(progress)
            return _fenced(session, claim, now, **values).cancel_requested

    def report(self, claim: Claim, kind: str, payload: Mapping[str, Any]) -> EventRecord:
        """Append a job event as this claim (kind "progress" also updates the job's
        progress summary). Raises LeaseLost."""
        values = {"progress": dict(payload)} if kind == "progress" else {}
        with self.db.session() as session:
            _fenced(session, claim, self.db.now(session), **values)
            return append_event(session, claim.job_id, kind, payload, claim.attempt)

    def checkpoint(self, claim: Claim, data: bytes) -> str:
        """Store checkpoint bytes as a blob and point the job at it; returns its SHA-256.
        The checkpoint it replaces is deleted unless something else refers to it.
        Raises LeaseLost (and then stores nothing)."""
        with self.db.session() as session:
            previous = session.scalar(select(Job.checkpoint_blob).where(Job.id == claim.job_id))
            sha256 = put_blob(session, data, CHECKPOINT_MEDIA_TYPE)
            # LeaseLost rolls back the blob too
            _fenced(session, claim, self.db.now(session), checkpoint_blob=sha256)
            if previous is not None and previous != sha256:
                drop_if_unreferenced(session, previous)
            return sha256

    def complete(
        self,
        claim: Claim,
        circuits: Sequence[NewCircuit] = (),
        *,
        result: Mapping[str, Any] | None = None,
    ) -> tuple[JobRecord, list[CircuitRecord]]:
        """Store the circuits (their job_id set to this job) and the result and mark the job
        SUCCEEDED, all in one transaction. Unless `result` has a "circuits" key, the stored
        result lists the new circuit ids under it. Raises LeaseLost (and then stores
        nothing)."""
        with self.db.session() as session:
            now = self.db.now(session)
            job = _fenced(session, claim, now, **_leave_running(JobState.SUCCEEDED, now),
                          result=dict(result or {}))
            stored = insert_circuits(session, circuits, job_id=claim.job_id)
            if stored and "circuits" not in job.result:  # the result names its circuits
                job.result = {**job.result, "circuits": [c.id for c in stored]}
                session.flush()
            append_event(session, job.id, "state",
                         {"state": JobState.SUCCEEDED.value, "circuits": [c.id for c in stored]},
                         claim.attempt)
            session.refresh(job)
            return job_record(job), stored

    def fail(self, claim: Claim, error: str, *, reason: str = "INTERNAL") -> JobRecord:
        """Mark the job FAILED with an error message and a reason code. Raises LeaseLost."""
        return self._finish(claim, JobState.FAILED, error=error, error_reason=reason)

    def acknowledge_cancel(self, claim: Claim) -> JobRecord:
        """The worker stopped after a cancellation request: the job becomes CANCELLED.
        Raises LeaseLost."""
        return self._finish(claim, JobState.CANCELLED, error="cancelled by request",
                            error_reason="CANCELLED")

    def release(self, claim: Claim) -> JobRecord:
        """Give the job back (drain on SIGTERM): PENDING again, resumable from its last
        checkpoint by the next claim. A job whose cancellation was requested ends CANCELLED
        instead (its worker stopped for the drain before a heartbeat told it): given back, it
        would run again. Raises LeaseLost."""
        return self._finish(claim, JobState.PENDING, cancel_wins=True)

    def reclaim_expired(self) -> list[str]:
        """Jobs whose lease expired go back to PENDING, or FAILED once they used
        `max_attempts` (CANCELLED if cancellation was requested). Returns their ids."""
        if self.db.is_sqlite:  # look first without taking SQLite's write lock
            with self.db.session(write=False) as session:
                if session.scalars(_expired(self.db.now(session)).limit(1)).first() is None:
                    return []
        reclaimed = []
        with self.db.session() as session:
            now = self.db.now(session)
            query = _expired(now)
            if self.db.dialect == "postgresql":
                query = query.with_for_update(skip_locked=True)
            for job in session.scalars(query).all():
                if job.cancel_requested:
                    state, error = JobState.CANCELLED, ("cancelled by request", "CANCELLED")
                elif job.attempt >= self.max_attempts:
                    message = (f"lease expired on attempt {job.attempt} of {self.max_attempts} "
                               f"(last worker {job.lease_owner})")
                    state, error = JobState.FAILED, (message, "LEASE_EXPIRED")
                else:
                    state, error = JobState.PENDING, (None, None)
                previous_owner = job.lease_owner
                for key, value in _leave_running(state, now).items():
                    setattr(job, key, value)
                if state.final:
                    job.error, job.error_reason = error
                session.flush()
                append_event(session, job.id, "state",
                             {"state": state.value, "reclaimed_from": previous_owner})
                reclaimed.append((job.id, state))
        if self.on_reclaim is not None:
            for job_id, state in reclaimed:
                self.on_reclaim(job_id, state)
        return [job_id for job_id, _ in reclaimed]

    def oldest_pending_age(self) -> float:
        """Seconds since the oldest PENDING job was created, 0 when none waits (a metric).
        Measured on this process's clock, the one `JobRepo.create` stamps jobs with."""
        with self.db.session(write=False) as session:
            oldest = session.scalar(select(func.min(Job.created_at))
                                    .where(Job.state == JobState.PENDING))
        if oldest is None:
            return 0.0
        return max((utcnow() - _aware(oldest)).total_seconds(), 0.0)

    def pending_count(self) -> int:
        """How many jobs wait (for the queue-depth metric)."""
        with self.db.session(write=False) as session:
            return session.scalar(
                select(func.count()).select_from(Job).where(Job.state == JobState.PENDING)
            ) or 0

    def _finish(self, claim: Claim, state: JobState, *, cancel_wins: bool = False,
                **values: Any) -> JobRecord:
        """Leave RUNNING under this claim's fence and record the state event; with
        `cancel_wins`, as CANCELLED if a cancel was requested (read under the same lock)."""
        with self.db.session() as session:
            now = self.db.now(session)
            if cancel_wins and _fenced(session, claim, now).cancel_requested:
                state, values = JobState.CANCELLED, {"error": "cancelled by request",
                                                     "error_reason": "CANCELLED"}
            job = _fenced(session, claim, now, **_leave_running(state, now), **values)
            payload = {"state": state.value}
            if values.get("error"):
                payload["error"] = values["error"]
            append_event(session, job.id, "state", payload, claim.attempt)
            session.refresh(job)
            return job_record(job)


def _aware(when: datetime) -> datetime:
    """A stored time as UTC-aware (SQLite hands them back naive)."""
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def _leave_running(state: JobState, now: Any) -> dict[str, Any]:
    """Column values for leaving RUNNING: the lease is cleared."""
    values: dict[str, Any] = {
        "state": state,
        "lease_owner": None,
        "lease_expires_at": None,
        "updated_at": now,
    }
    if state.final:
        values["finished_at"] = now
    return values


def _expired(now: datetime) -> Select[tuple[Job]]:
    """RUNNING jobs whose lease ended before ``now`` (the database's time)."""
    return select(Job).where(Job.state == JobState.RUNNING, Job.lease_expires_at < now)


def _fenced(session: Session, claim: Claim, now: datetime, **values: Any) -> Job:
    """UPDATE the job only if it is still RUNNING under this claim; raises LeaseLost.

    ``now`` is the database's time (`Database.now`). With no values it still locks the row
    (PostgreSQL) so the rest of the transaction is fenced too.
    """
    values.setdefault("updated_at", now)
    job = session.scalars(
        update(Job)
        .where(
            Job.id == claim.job_id,
            Job.attempt == claim.attempt,
            Job.lease_owner == claim.worker_id,
            Job.state == JobState.RUNNING,
        )
        .values(**values)
        .returning(Job)
    ).one_or_none()
    if job is None:
        current = session.get(Job, claim.job_id, populate_existing=True)
        if current is None:
            reason = "job no longer exists"
        elif current.attempt != claim.attempt:
            reason = f"attempt {current.attempt} took the job over"
        else:
            reason = f"job is {current.state.value}"
        raise LeaseLost(claim.job_id, claim.attempt, reason)
    return job


def _check_lease(lease_s: float) -> None:
    if not (isinstance(lease_s, (int, float)) and math.isfinite(lease_s) and lease_s > 0):
        raise InvalidArgument(f"must be a positive number of seconds, got {lease_s!r}",
                              field="lease_s")
