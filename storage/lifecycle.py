"""Deleting finished jobs: one on request, or every one past a retention age.

A job goes with its events and its checkpoint reference (the checkpoint blob itself is freed
by `BlobStore.delete_unreferenced`, since blobs are shared by content). The circuits it found
stay, with their job link cleared. Each step is an explicit statement rather than left to the
foreign keys' ON DELETE rules, so SQLite and PostgreSQL do the same whatever a connection's
foreign-key setting.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from edgeprune.storage.errors import Conflict, NotFound
from edgeprune.storage.models import Circuit, Job, JobEvent
from edgeprune.storage.records import JobState

FINAL_STATES = [state for state in JobState if state.final]


def delete_job(session: Session, job_id: str) -> None:
    """Delete one final job. Raises NotFound, or Conflict while it is PENDING or RUNNING (a
    worker may hold it: it has to be cancelled first)."""
    query = select(Job.state).where(Job.id == job_id).with_for_update()
    state = session.scalar(query)
    if state is None:
        raise NotFound("job", job_id)
    if not JobState(state).final:
        raise Conflict(f"job {job_id} is {JobState(state).value}: cancel it first, then delete "
                       "it once it has stopped")
    delete_jobs(session, [job_id])


def delete_jobs_finished_before(session: Session, cutoff: datetime, *, limit: int) -> int:
    """Delete up to ``limit`` final jobs that ended before ``cutoff``; returns how many."""
    ids = list(session.scalars(
        select(Job.id)
        .where(Job.state.in_(FINAL_STATES), Job.finished_at < cutoff)
        .order_by(Job.finished_at)
        .limit(limit)
    ))
    delete_jobs(session, ids)
    return len(ids)


def delete_jobs(session: Session, job_ids: Sequence[str]) -> None:
    """Delete these jobs, their events and their circuits' links to them."""
    if not job_ids:
        return
    ids = list(job_ids)
    session.execute(update(Circuit).where(Circuit.job_id.in_(ids)).values(job_id=None)
                    .execution_options(synchronize_session=False))
    session.execute(delete(JobEvent).where(JobEvent.job_id.in_(ids))
                    .execution_options(synchronize_session=False))
    session.execute(delete(Job).where(Job.id.in_(ids)).execution_options(synchronize_session=False))


def job_reading_circuit(session: Session, circuit_id: int) -> str | None:
    """An unfinished job that will read this circuit (an evaluation of it), or None."""
    names = [str(circuit_id), f"circuits/{circuit_id}"]
    return session.scalar(
        select(Job.id)
        .where(Job.state.in_([JobState.PENDING, JobState.RUNNING]),
               Job.spec_json["circuit"].as_string().in_(names))
        .limit(1)
    )
