"""The queue in one process: order, leases, fencing, reclaim, cancellation, atomic results."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select

from edgeprune.storage import (
    BlobStore,
    CircuitFilter,
    CircuitRepo,
    Database,
    EventRepo,
    InvalidArgument,
    JobRepo,
    JobState,
    LeaseLost,
    NewCircuit,
    NewJob,
    NotFound,
    Queue,
)
from edgeprune.storage.models import Circuit

SHORT_LEASE_S = 0.3


def submit(db: Database, n: int = 1, **kwargs) -> list[str]:
    jobs = JobRepo(db)
    return [jobs.create(NewJob(spec=b"", spec_json={}, **kwargs)).id for _ in range(n)]


def circuit(**kwargs) -> NewCircuit:
    return NewCircuit(model="tiny", method="edge_pruning", edges=["tok->m0"], total_edge_count=3, **kwargs)


def expire(claim_lease_s: float = SHORT_LEASE_S) -> None:
    time.sleep(claim_lease_s + 0.2)


def test_claims_by_priority_then_age(db: Database) -> None:
    low = submit(db, 2)
    high = submit(db, 1, priority=5)
    queue = Queue(db)
    order = [queue.claim("w", 30).job_id for _ in range(3)]
    assert order == [high[0], low[0], low[1]]
    assert queue.claim("w", 30) is None


def test_claim_filters_by_kind(db: Database) -> None:
    prune = submit(db, 1, kind="prune")
    queue = Queue(db)
    assert queue.claim("w", 30, kinds=["sweep"]) is None
    assert queue.claim("w", 30, kinds=["prune", "sweep"]).job_id == prune[0]


def test_claim_sets_lease_and_running_state(db: Database) -> None:
    (job_id,) = submit(db)
    claim = Queue(db).claim("worker-a", 30)
    job = JobRepo(db).get(job_id)
    assert (job.state, job.attempt, job.lease_owner) == (JobState.RUNNING, 1, "worker-a")
    assert claim.attempt == 1 and job.lease_expires_at == claim.lease_expires_at
    assert job.started_at is not None


@pytest.mark.parametrize("lease_s", [0, -1, float("nan"), float("inf")])
def test_bad_lease_is_rejected(db: Database, lease_s: float) -> None:
    with pytest.raises(InvalidArgument):
        Queue(db).claim("w", lease_s)


def test_heartbeat_extends_lease_and_reports_progress(db: Database) -> None:
    submit(db)
    queue = Queue(db)
    claim = queue.claim("w", SHORT_LEASE_S)
    for _ in range(3):
        time.sleep(SHORT_LEASE_S / 2)
        assert queue.heartbeat(claim, progress={"step": 1}) is False
    assert queue.reclaim_expired() == []
    event = queue.report(claim, "progress", {"step": 2, "loss": 0.5})
    job = JobRepo(db).get(claim.job_id)
    assert job.progress == {"step": 2, "loss": 0.5} and job.last_event_sequence == event.sequence


def test_expired_lease_is_reclaimed_and_stale_writes_are_fenced(db: Database) -> None:
    (job_id,) = submit(db)
    queue = Queue(db)
    stale = queue.claim("dead", SHORT_LEASE_S)
    sha = queue.checkpoint(stale, b"step 10")
    expire()
    assert queue.reclaim_expired() == [job_id]
    # back in PENDING: the old claim can no longer write
    with pytest.raises(LeaseLost, match="PENDING"):
        queue.heartbeat(stale)
    fresh = queue.claim("alive", 30)
    assert fresh.attempt == 2 and fresh.job.checkpoint_blob == sha  # resumes from checkpoint
    for write in (
        lambda: queue.heartbeat(stale),
        lambda: queue.report(stale, "progress", {"step": 11}),
        lambda: queue.checkpoint(stale, b"stale step 11"),
        lambda: queue.complete(stale, [circuit()]),
        lambda: queue.fail(stale, "boom"),
        lambda: queue.release(stale),
    ):
        with pytest.raises(LeaseLost, match="attempt 2 took the job over"):
            write()
    queue.complete(fresh, [circuit()])
    job = JobRepo(db).get(job_id)
    assert job.state == JobState.SUCCEEDED and job.checkpoint_blob == sha
    assert len(CircuitRepo(db).list(CircuitFilter(job_id=job_id)).items) == 1
    assert not BlobStore(db).exists(_sha(b"stale step 11"))


def test_lease_expiring_too_often_fails_the_job(db: Database) -> None:
    (job_id,) = submit(db)
    queue = Queue(db, max_attempts=2, reclaim_interval_s=0)
    for _ in range(2):
        assert queue.claim("w", SHORT_LEASE_S) is not None
        expire()
    assert queue.claim("w", 30) is None  # the claim reclaimed it into FAILED
    job = JobRepo(db).get(job_id)
    assert job.state == JobState.FAILED and job.error_reason == "LEASE_EXPIRED"
    assert "attempt 2 of 2" in job.error


def test_complete_stores_result_and_circuits_atomically(db: Database) -> None:
    (job_id,) = submit(db)
    queue = Queue(db)
    claim = queue.claim("w", 30)
    with pytest.raises(NotFound):  # a bad circuit rolls back the whole result
        queue.complete(claim, [circuit(), circuit(mask_blob="0" * 64)], result={"cpr": 0.9})
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(Circuit)) == 0
    assert JobRepo(db).get(job_id).state == JobState.RUNNING
    job, stored = queue.complete(claim, [circuit(), circuit()], result={"cpr": 0.9})
    assert job.state == JobState.SUCCEEDED
    assert job.result == {"cpr": 0.9, "circuits": [c.id for c in stored]}
    assert job.lease_owner is None and job.finished_at is not None
    assert {c.job_id for c in stored} == {job_id}
    last = EventRepo(db).after(job_id)[-1]
    assert last.payload == {"state": "SUCCEEDED", "circuits": [c.id for c in stored]}
    with pytest.raises(LeaseLost, match="SUCCEEDED"):
        queue.complete(claim, [circuit()])


def test_fail_records_error(db: Database) -> None:
    submit(db)
    queue = Queue(db)
    claim = queue.claim("w", 30)
    job = queue.fail(claim, "out of memory", reason="RESOURCE_EXHAUSTED")
    assert (job.state, job.error, job.error_reason) == (
        JobState.FAILED, "out of memory", "RESOURCE_EXHAUSTED")


def test_cancel_is_seen_at_next_heartbeat(db: Database) -> None:
    (job_id,) = submit(db)
    queue = Queue(db)
    claim = queue.claim("w", 30)
    assert queue.heartbeat(claim) is False
    assert JobRepo(db).request_cancel(job_id).state == JobState.RUNNING
    assert queue.heartbeat(claim) is True
    assert queue.acknowledge_cancel(claim).state == JobState.CANCELLED
    kinds = [(e.kind, e.payload.get("state")) for e in EventRepo(db).after(job_id)]
    assert kinds[-2:] == [("cancel_requested", None), ("state", "CANCELLED")]


def test_cancelled_job_whose_worker_died_ends_cancelled(db: Database) -> None:
    (job_id,) = submit(db)
    queue = Queue(db)
    queue.claim("dead", SHORT_LEASE_S)
    JobRepo(db).request_cancel(job_id)
    expire()
    assert queue.reclaim_expired() == [job_id]
    assert JobRepo(db).get(job_id).state == JobState.CANCELLED


def test_new_checkpoint_replaces_the_old_one(db: Database) -> None:
    submit(db)
    queue, blobs = Queue(db), BlobStore(db)
    claim = queue.claim("w", 30)
    first = queue.checkpoint(claim, b"step 1")
    assert queue.checkpoint(claim, b"step 1") == first  # same bytes: kept
    second = queue.checkpoint(claim, b"step 2")
    assert JobRepo(db).get(claim.job_id).checkpoint_blob == second
    assert blobs.exists(second) and not blobs.exists(first)


def test_release_on_drain_returns_job_to_pending(db: Database) -> None:
    submit(db)
    queue = Queue(db)
    claim = queue.claim("draining", 30)
    sha = queue.checkpoint(claim, b"mask state")
    assert queue.release(claim).state == JobState.PENDING
    assert queue.pending_count() == 1
    again = queue.claim("other", 30)
    assert again.attempt == 2 and again.job.checkpoint_blob == sha
    assert BlobStore(db).get(sha) == b"mask state"


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_a_job_released_after_a_cancel_request_ends_cancelled(db: Database) -> None:
    """A drain stops the job before a heartbeat saw the cancel: giving it back would run it
    again, so the release ends it CANCELLED (and never says PENDING)."""
    (job_id,) = submit(db)
    queue = Queue(db)
    claim = queue.claim("w", 30)
    JobRepo(db).request_cancel(job_id)
    job = queue.release(claim)
    assert (job.state, job.error, job.error_reason) == (
        JobState.CANCELLED, "cancelled by request", "CANCELLED")
    states = [e.payload.get("state") for e in EventRepo(db).after(job_id) if e.kind == "state"]
    assert states == ["PENDING", "RUNNING", "CANCELLED"]
    assert queue.claim("w", 30) is None
