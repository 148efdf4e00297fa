"""Jobs: creation, idempotency per owner + request_id, listing, cancellation."""

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
    QueueFull,
)


def new_job(request_id: str | None = None, *, spec: bytes = b"\x08\x01", owner: str = "",
            **kwargs) -> NewJob:
    return NewJob(spec=spec, spec_json={"steps": 1}, request_id=request_id, owner=owner,
                  kind="prune", **kwargs)


def test_create_and_get(db: Database) -> None:
    jobs = JobRepo(db)
    job = jobs.create(new_job(labels={"team": "a"}, priority=3))
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
    # request ids are per owner
    assert jobs.create(new_job("req-1", owner="someone-else")).id != first.id
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
    created = [jobs.create(new_job(owner="c1" if i % 2 else "c2")) for i in range(7)]
    seen, token = [], None
    while True:
        page = jobs.list(page_size=3, page_token=token)
        seen += [j.id for j in page.items]
        if not (token := page.next_page_token):
            break
    assert seen == [j.id for j in reversed(created)]
    c1 = jobs.list(owner="c1", page_size=2)
    assert [j.owner for j in c1.items] == ["c1", "c1"]
    with pytest.raises(InvalidArgument):  # token made for another filter
        jobs.list(owner="c2", page_token=c1.next_page_token)
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


def _job_with_examples(n: int, *, model: str = "m", labels: dict[str, str] | None = None) -> NewJob:
    examples = [{"clean": f"prompt {i} " + "x" * 100} for i in range(n)]
    spec_json = {"model": model, "data": {"examples": {"examples": examples, "all_positions": True}}}
    return NewJob(spec=b"s" * (200 * n), spec_json=spec_json, labels=labels or {})


def test_reads_summarise_the_spec_in_the_database(db: Database) -> None:
    jobs = JobRepo(db)
    job = jobs.create(_job_with_examples(30))
    plain = jobs.create(new_job())
    basic = jobs.get(job.id, full=False)
    assert basic.spec == b""
    assert basic.spec_json == {"model": "m", "data": {"examples": {"all_positions": True,
                                                                   "example_count": 30}}}
    full = jobs.get(job.id)
    assert full.spec == b"s" * 6000 and full.spec_json == basic.spec_json
    assert jobs.get(plain.id, full=False).spec_json == {"steps": 1}  # nothing to summarise
    assert [j.spec for j in jobs.list().items] == [b"", b""]
    assert [j.spec for j in jobs.list(full=True).items] == [b"\x08\x01", b"s" * 6000]


def test_full_pages_end_before_the_byte_budget(db: Database) -> None:
    jobs = JobRepo(db)
    created = [jobs.create(_job_with_examples(10)) for _ in range(5)]  # 2000 spec bytes each
    seen, token, pages = [], None, 0
    while True:
        page = jobs.list(full=True, max_bytes=7000, page_token=token, page_size=10)
        assert len(page.items) <= 2 and all(len(j.spec) == 2000 for j in page.items)
        seen += [j.id for j in page.items]
        pages += 1
        if not (token := page.next_page_token):
            break
    assert seen == [j.id for j in reversed(created)] and pages == 3
    alone = jobs.list(full=True, max_bytes=1000, page_size=10)  # no record fits: a summary
    assert [j.spec for j in alone.items] == [b""] and alone.next_page_token
    assert jobs.get(created[0].id, max_bytes=1000).spec == b""


def test_list_filters_on_model_and_labels(db: Database) -> None:
    jobs = JobRepo(db)
    a = jobs.create(_job_with_examples(1, model="a", labels={"team": "x", "env": "prod"}))
    jobs.create(_job_with_examples(1, model="b", labels={"team": "x"}))
    jobs.create(_job_with_examples(1, model="a", labels={"team": "y"}))
    assert [j.id for j in jobs.list(model="a", labels={"team": "x"}).items] == [a.id]
    assert len(jobs.list(labels={"team": "x"}).items) == 2
    assert len(jobs.list(model="a").items) == 2
    assert jobs.list(model="c").items == []
    first = jobs.list(model="a", page_size=1)
    with pytest.raises(InvalidArgument):  # token made for another filter
        jobs.list(model="b", page_token=first.next_page_token)


def test_pending_cap_is_exact_under_concurrent_creates(db: Database) -> None:
    jobs, cap = JobRepo(db), 5

    def create(i: int) -> tuple[str, str]:
        try:
            return f"r{i}", jobs.create(new_job(f"r{i}"), max_pending=cap).id
        except QueueFull:
            return f"r{i}", ""

    with ThreadPoolExecutor(8) as pool:
        admitted = {rid: job_id for rid, job_id in pool.map(create, range(40)) if job_id}
    assert len(admitted) == cap
    rid, job_id = next(iter(admitted.items()))  # a repeated request_id returns its job
    assert jobs.create(new_job(rid), max_pending=cap).id == job_id
    with pytest.raises(QueueFull):
        jobs.create(new_job("r-over"), max_pending=cap)
    assert jobs.create(new_job("r-more"), max_pending=cap + 1).state == JobState.PENDING
