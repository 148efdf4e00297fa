"""The queue under real worker processes: nothing claimed twice, nothing lost, a killed
worker's job finished by another and its late writes rejected."""

from __future__ import annotations

import multiprocessing
import os
import signal

import pytest

from edgeprune.storage import (
    BlobStore,
    CircuitFilter,
    CircuitRepo,
    Database,
    EventRepo,
    JobRepo,
    JobState,
    LeaseLost,
    NewJob,
    Queue,
)
from tests.storage import workers

N_WORKERS = 4
N_JOBS = 200
LEASE_S = 1.5
CTX = multiprocessing.get_context("spawn")


def test_workers_claim_every_job_exactly_once(db: Database, db_url: str) -> None:
    jobs = JobRepo(db)
    job_ids = {jobs.create(NewJob(spec=b"", spec_json={"i": i})).id for i in range(N_JOBS)}
    start, results = CTX.Event(), CTX.Queue()
    procs = [
        CTX.Process(target=workers.drain_queue, args=(db_url, f"w{i}", start, results))
        for i in range(N_WORKERS)
    ]
    for p in procs:
        p.start()
    start.set()
    claimed = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0

    pairs = [pair for per_worker in claimed.values() for pair in per_worker]
    assert len(pairs) == N_JOBS  # nothing claimed twice ...
    assert {job_id for job_id, _ in pairs} == job_ids  # ... nothing lost
    assert {attempt for _, attempt in pairs} == {1}
    assert sum(1 for per_worker in claimed.values() if per_worker) >= 2  # really concurrent
    final = jobs.list(states=[JobState.SUCCEEDED], page_size=1000).items
    assert {j.id for j in final} == job_ids
    events = EventRepo(db)
    for job in final:
        assert job.result["worker"] == dict(_owners(claimed))[job.id]
        seqs = [e.sequence for e in events.after(job.id)]
        assert seqs == [1, 2, 3, 4]  # PENDING, RUNNING, progress, SUCCEEDED
    assert len(CircuitRepo(db).list(CircuitFilter(model="tiny"), page_size=1000).items) == N_JOBS


def test_killed_worker_job_is_finished_by_another_and_late_writes_rejected(
    db: Database, db_url: str
) -> None:
    (job_id,) = [JobRepo(db).create(NewJob(spec=b"", spec_json={})).id]
    victim_end, parent_end = CTX.Pipe()
    victim = CTX.Process(target=workers.claim_and_hang, args=(db_url, "victim", LEASE_S, victim_end))
    victim.start()
    assert parent_end.poll(60), "the victim never claimed"
    stale = parent_end.recv()
    assert stale is not None and stale.job_id == job_id
    os.kill(victim.pid, signal.SIGKILL)  # mid-job, holding the lease
    victim.join(timeout=30)
    assert victim.exitcode == -signal.SIGKILL

    rescuer_end, parent_end2 = CTX.Pipe()
    rescuer = CTX.Process(target=workers.rescue, args=(db_url, "rescuer", 30.0, 60.0, rescuer_end))
    rescuer.start()
    assert parent_end2.poll(90), "the rescuer never finished"
    fresh, circuit_ids = parent_end2.recv()
    rescuer.join(timeout=30)
    assert fresh.attempt == 2 and fresh.worker_id == "rescuer"
    assert fresh.job.checkpoint_blob is not None  # it resumed from the victim's checkpoint
    assert BlobStore(db).get(fresh.job.checkpoint_blob) == b"checkpoint of victim"

    queue = Queue(db)
    late_writes = {
        "heartbeat": lambda: queue.heartbeat(stale),
        "report": lambda: queue.report(stale, "progress", {"step": 99}),
        "checkpoint": lambda: queue.checkpoint(stale, b"late"),
        "complete": lambda: queue.complete(stale, [workers.circuit_for(job_id, "victim")]),
        "fail": lambda: queue.fail(stale, "late failure"),
    }
    for name, write in late_writes.items():
        with pytest.raises(LeaseLost):
            write()
        print("rejected late", name)
    job = JobRepo(db).get(job_id)
    assert job.state == JobState.SUCCEEDED and job.attempt == 2 and job.error is None
    stored = CircuitRepo(db).list(CircuitFilter(job_id=job_id), full=True).items
    assert [c.id for c in stored] == circuit_ids
    assert stored[0].provenance["worker"] == "rescuer"
    states = [e.payload.get("state") for e in EventRepo(db).after(job_id) if e.kind == "state"]
    assert states == ["PENDING", "RUNNING", "PENDING", "RUNNING", "SUCCEEDED"]


def _owners(claimed: dict[str, list[tuple[str, int]]]) -> list[tuple[str, str]]:
    return [(job_id, worker) for worker, pairs in claimed.items() for job_id, _ in pairs]
