"""Jobs: creation, idempotency per caller + request_id, listing, cancellation."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from edgeprune.storage import (
    AlreadyExists,
    Database,
    EventRepo,
    InvalidArgument,
    JobRepo,
    JobState,
    NewJob,
    NotFound,
    Queue,
)


def new_job(request_id: str | None = None, *, spec: bytes = b"\x08\x01", caller: str = "",
            **kwargs) -> NewJob:
    return NewJob(spec=spec, spec_json={"steps": 1}, request_id=request_id, caller=caller,
                  kind="prune", **kwargs)


def test_create_and_get(db: Database) -> None:
    jobs = JobRepo(db)
    job = jobs.create(new_job(labels={"team": "a"}, priority=3, display_name="ioi"))
    assert job.state == JobState.PENDING and job.attempt == 0
    got = jobs.get(job.id)
    assert got == job
    assert got.spec == b"\x08\x01" and got.spec_json == {"steps": 1} and got.labels == {"team": "a"}
    assert got.created_at.tzinfo is not None
    assert [e.payload for e in EventRepo(db).after(job.id)] == [{"state": "PENDING"}]


def test_same_request_id_gives_same_job(db: Database) -> None:
    jobs = JobRepo(db)
    first = jobs.create(new_job("req-1"))
    assert jobs.create(new_job("req-1")).id == first.id
    # request ids are per caller
    assert jobs.create(new_job("req-1", caller="someone-else")).id != first.id
    with pytest.raises(AlreadyExists, match="different job"):
        jobs.create(new_job("req-1", spec=b"\x08\x02"))
    assert len(jobs.list().items) == 2


def test_concurrent_duplicate_submissions_create_one_job(db: Database) -> None:
    jobs = JobRepo(db)
    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(lambda _: jobs.create(new_job("dup")).id, range(16)))
    assert len(ids) == 1
    assert len(jobs.list().items) == 1


def test_unknown_job_is_not_found(db: Database) -> None:
    with pytest.raises(NotFound):
        JobRepo(db).get("nope")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"labels": {"a": 1}}, "labels"), ({"priority": "high"}, "priority"),
     ({"request_id": ""}, "request_id")],
)
def test_invalid_jobs_are_rejected(db: Database, kwargs: dict, field: str) -> None:
    base = {"spec": b"", "spec_json": {}}
    with pytest.raises(InvalidArgument) as info:
        JobRepo(db).create(NewJob(**(base | kwargs)))
    assert info.value.field == field


def test_list_pages_newest_first_with_filters(db: Database) -> None:
    jobs = JobRepo(db)
    created = [jobs.create(new_job(caller="c1" if i % 2 else "c2")) for i in range(7)]
    seen, token = [], None
    while True:
        page = jobs.list(page_size=3, page_token=token)
        seen += [j.id for j in page.items]
        if not (token := page.next_page_token):
            break
    assert seen == [j.id for j in reversed(created)]
    c1 = jobs.list(caller="c1", page_size=2)
    assert [j.caller for j in c1.items] == ["c1", "c1"]
    with pytest.raises(InvalidArgument):  # token made for another filter
        jobs.list(caller="c2", page_token=c1.next_page_token)
    Queue(db).claim("w", 30)
    assert [j.id for j in jobs.list(states=[JobState.RUNNING]).items] == [created[0].id]


def test_cancel_pending_job_is_immediate(db: Database) -> None:
    jobs = JobRepo(db)
    job = jobs.create(new_job())
    cancelled = jobs.request_cancel(job.id)
    assert cancelled.state == JobState.CANCELLED and cancelled.finished_at is not None
    assert Queue(db).claim("w", 30) is None
    assert jobs.request_cancel(job.id) == cancelled  # final: unchanged
    with pytest.raises(NotFound):
        jobs.request_cancel("nope")
