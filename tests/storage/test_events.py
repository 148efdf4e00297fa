"""Job events: dense sequence numbers per job, replay after a sequence number."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from edgeprune.storage import Database, EventRepo, InvalidArgument, JobRepo, NewJob, NotFound

N_THREADS = 4
N_APPENDS = 15


def make_job(db: Database) -> str:
    return JobRepo(db).create(NewJob(spec=b"", spec_json={})).id


def test_concurrent_appends_are_dense_per_job(db: Database) -> None:
    jobs = [make_job(db), make_job(db)]
    events = EventRepo(db)

    def append(thread: int) -> None:
        for i in range(N_APPENDS):
            for job_id in jobs:
                events.append(job_id, "log", {"thread": thread, "i": i})

    with ThreadPoolExecutor(N_THREADS) as pool:
        list(pool.map(append, range(N_THREADS)))
    for job_id in jobs:
        stored = events.after(job_id, 0, limit=1000)
        expected = 1 + N_THREADS * N_APPENDS  # the PENDING event, then the appends
        assert [e.sequence for e in stored] == list(range(1, expected + 1))
        assert events.last_sequence(job_id) == expected
        per_thread = [[e.payload["i"] for e in stored if e.payload.get("thread") == t]
                      for t in range(N_THREADS)]
        assert all(seq == sorted(seq) for seq in per_thread)  # each writer's order kept


def test_after_replays_from_a_sequence_number(db: Database) -> None:
    job_id = make_job(db)
    events = EventRepo(db)
    for step in range(5):
        events.append(job_id, "progress", {"step": step})
    assert [e.sequence for e in events.after(job_id, 3)] == [4, 5, 6]
    assert [e.sequence for e in events.after(job_id, 1, limit=2)] == [2, 3]
    assert events.after(job_id, 6) == []
    event = events.after(job_id, 5)[0]
    assert (event.kind, event.payload, event.attempt) == ("progress", {"step": 4}, 0)


def test_unknown_job_and_bad_arguments(db: Database) -> None:
    events = EventRepo(db)
    with pytest.raises(NotFound):
        events.after("nope")
    with pytest.raises(NotFound):
        events.append("nope", "log", {})
    with pytest.raises(NotFound):
        events.last_sequence("nope")
    job_id = make_job(db)
    with pytest.raises(InvalidArgument):
        events.after(job_id, limit=0)
    with pytest.raises(InvalidArgument):
        events.append(job_id, "", {})
    with pytest.raises(InvalidArgument):
        events.append(job_id, "log", ["not", "an", "object"])  # type: ignore[arg-type]
