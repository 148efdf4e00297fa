"""The API under load, over a real server on both backends: reads that never load what they
do not return (measured on the API process through /proc), FULL pages bounded by the reply
size, WatchJob streams that page stored events and share one poller, per-client stream caps,
and a pending-job cap that concurrent submits cannot overshoot."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Self

import grpc
import pytest
from sqlalchemy import insert, update

from edgeprune.storage import CircuitRepo, Database, EventRepo, JobRepo, NewCircuit
from edgeprune.storage.models import Job, JobEvent
from edgeprune.v1 import circuit_pb2, circuit_pb2_grpc, common_pb2, job_pb2, job_pb2_grpc
from tests.service.conftest import database_url, running
from tests.service.errors import details, fails
from tests.service.harness import Server, edge_pruning_spec, short_examples_spec, wait_for

MIB = 1024 * 1024
BIG_JOBS = 12
# Short examples: about 0.6 MB of protobuf and 1.6 MB of JSON a job, but about 10 MB as
# Python objects, which is what a read that loads specs pays.
BIG_EXAMPLES = 20_000
REPLY_LIMIT = 4 * MIB  # the load server's max_message_bytes: FULL pages of about 6 jobs
HISTORY = 50_000  # events of the watched job, 1 kB each


def rss(pid: int) -> tuple[int, int]:
    """(current, peak) resident bytes of a process."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return (int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024)


class PeakGrowth:
    """How far a process's resident memory rose above where it stood on entry."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.grew = 0

    def __enter__(self) -> Self:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # the peak restarts from now
        self.start = rss(self.pid)[0]
        return self

    def __exit__(self, *exc: object) -> None:
        self.grew = rss(self.pid)[1] - self.start


def big_spec(i: int) -> job_pb2.JobSpec:
    return short_examples_spec(i, BIG_EXAMPLES)


@pytest.fixture(scope="module")
def load_server(backend: str, tmp_path_factory: pytest.TempPathFactory,
                tiny_gpt2_dir: Path) -> Iterator[Server]:
    """The API alone, holding BIG_JOBS jobs of BIG_EXAMPLES inline examples each; restarted
    after the submits, so the memory they left in its heap cannot hide what a read costs."""
    folder = tmp_path_factory.mktemp(f"load-{backend}")
    with database_url(backend, folder) as url, running(
        folder, url, tiny_gpt2_dir, workers=0, max_inline_examples=BIG_EXAMPLES,
        max_message_bytes=REPLY_LIMIT, max_watches_per_client=400,
    ) as server:
        for i in range(BIG_JOBS):
            server.jobs.SubmitJob(job_pb2.SubmitJobRequest(spec=big_spec(i),
                                                           labels={"set": "big"}), timeout=120)
        server.stop()
        server.start()
        yield server


def big_replies(server: Server) -> job_pb2_grpc.JobServiceStub:
    """Jobs on a channel that takes replies up to 64 MiB (the client's default is 4 MiB)."""
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}",
                                    options=[("grpc.max_receive_message_length", 64 * MIB)])
    return job_pb2_grpc.JobServiceStub(channel)


def list_all(server: Server, view: int) -> list[job_pb2.ListJobsResponse]:
    pages, token, stub = [], "", big_replies(server)
    while True:
        page = stub.ListJobs(job_pb2.ListJobsRequest(
            page_size=1000, page_token=token, view=view, labels={"set": "big"}), timeout=120)
        pages.append(page)
        if not (token := page.next_page_token):
            return pages


def test_basic_list_reads_no_specs(load_server: Server) -> None:
    assert load_server.proc is not None
    load_server.jobs.ListJobs(job_pb2.ListJobsRequest(page_size=1), timeout=60)  # first-call costs
    with PeakGrowth(load_server.proc.pid) as growth:
        (page,) = list_all(load_server, common_pb2.VIEW_BASIC)
    assert len(page.jobs) == BIG_JOBS
    for job in page.jobs:  # the source stays inline examples, counted, not sent
        assert job.spec.data.WhichOneof("source") == "examples"
        assert job.spec.data.examples.example_count == BIG_EXAMPLES
        assert not job.spec.data.examples.examples and job.spec.model
    # Loading the specs costs about 150 MB here. PostgreSQL cuts the summaries out of the specs
    # in its own process; SQLite does it in ours, its page cache taking the JSON text read.
    assert growth.grew < 80 * MIB, f"BASIC ListJobs grew the API by {growth.grew / MIB:.0f} MiB"


def test_full_list_pages_stop_at_the_reply_size(load_server: Server) -> None:
    assert load_server.proc is not None
    with PeakGrowth(load_server.proc.pid) as growth:
        pages = list_all(load_server, common_pb2.VIEW_FULL)
    jobs = [job for page in pages for job in page.jobs]
    assert len(jobs) == BIG_JOBS and len({j.name for j in jobs}) == BIG_JOBS
    sizes = [page.ByteSize() for page in pages]
    assert len(pages) > 1 and all(size < REPLY_LIMIT for size in sizes)
    assert all(size > REPLY_LIMIT / 2 for size in sizes[:-1])  # full pages, not one job each
    for job in jobs:
        assert len(job.spec.data.examples.examples) == BIG_EXAMPLES
        assert job.spec.data.examples.example_count == BIG_EXAMPLES
    # One page's specs at a time (bytes, parsed messages, the serialised reply), not all of them
    # with their JSON (about 150 MB).
    assert growth.grew < 80 * MIB, f"FULL ListJobs grew the API by {growth.grew / MIB:.0f} MiB"


def test_get_job_views(load_server: Server) -> None:
    name = list_all(load_server, common_pb2.VIEW_BASIC)[0].jobs[0].name
    basic = load_server.jobs.GetJob(job_pb2.GetJobRequest(name=name), timeout=60)
    full = big_replies(load_server).GetJob(
        job_pb2.GetJobRequest(name=name, view=common_pb2.VIEW_FULL), timeout=60)
    assert basic.spec.data.examples.example_count == BIG_EXAMPLES
    assert not basic.spec.data.examples.examples
    assert len(full.spec.data.examples.examples) == BIG_EXAMPLES
    basic.spec.data.examples.examples.extend(full.spec.data.examples.examples)
    assert basic.spec == full.spec  # BASIC is FULL less the examples


def test_basic_view_keeps_every_kind_of_source(load_server: Server) -> None:
    task = edge_pruning_spec()
    task.data.task.name = "ioi"
    task.data.task.example_count = 16
    job = load_server.jobs.SubmitJob(job_pb2.SubmitJobRequest(spec=task), timeout=60)
    got = load_server.jobs.GetJob(job_pb2.GetJobRequest(name=job.name), timeout=60)
    for reply in (job, got):
        assert reply.spec.data.WhichOneof("source") == "task"
        assert reply.spec.data.task.name == "ioi" and not reply.spec.data.HasField("examples")


def test_full_circuit_pages_stop_at_the_reply_size(load_server: Server) -> None:
    edges = [f"a{i // 100}.h{i % 100}->m{i % 7}.in" for i in range(20_000)]  # ~0.6 MB a circuit
    db = Database(load_server.database_url)
    try:
        CircuitRepo(db).create_many([NewCircuit(model="wide", method="eap", edges=edges,
                                                total_edge_count=40_000) for _ in range(10)])
    finally:
        db.dispose()
    stub = circuit_pb2_grpc.CircuitServiceStub(grpc.insecure_channel(
        f"127.0.0.1:{load_server.port}", options=[("grpc.max_receive_message_length", 64 * MIB)]))
    pages, token = [], ""
    while True:
        page = stub.ListCircuits(circuit_pb2.ListCircuitsRequest(
            model="wide", page_size=1000, page_token=token, view=common_pb2.VIEW_FULL), timeout=120)
        pages.append(page)
        if not (token := page.next_page_token):
            break
    circuits = [c for page in pages for c in page.circuits]
    assert len(circuits) == 10 and all(len(c.edges) == 20_000 for c in circuits)
    assert not any(c.edges_omitted for c in circuits)
    assert len(pages) > 1 and all(page.ByteSize() < REPLY_LIMIT for page in pages)


def test_a_circuit_too_large_for_a_reply_is_summarised_and_still_exported(
        load_server: Server) -> None:
    """GetCircuit FULL of a circuit past the reply limit answers without its edges
    (edges_omitted) instead of failing; ExportCircuit streams all of them."""
    edges = [f"a{i // 200}.h{i % 200}->m{i % 9}.in" for i in range(160_000)]  # ~5 MB
    db = Database(load_server.database_url)
    try:
        record = CircuitRepo(db).create(NewCircuit(model="huge", method="eap", edges=edges,
                                                   total_edge_count=400_000))
    finally:
        db.dispose()
    name = f"circuits/{record.id}"
    got = load_server.circuits.GetCircuit(circuit_pb2.GetCircuitRequest(
        name=name, view=common_pb2.VIEW_FULL), timeout=120)
    assert got.edges_omitted and not got.edges and got.edge_count == len(edges)
    exported = b"".join(part.data for part in load_server.circuits.ExportCircuit(
        circuit_pb2.ExportCircuitRequest(name=name, format=circuit_pb2.EXPORT_FORMAT_JSON),
        timeout=300))
    assert len(json.loads(exported)["edges"]) == len(edges)


# ------------------------------------------------------------------------------------- watch


def add_history(url: str, job_id: str, count: int) -> int:
    """Store `count` progress events of about 1 kB after the job's own (as a long-running
    worker would have); returns the last sequence number."""
    db = Database(url)
    try:
        with db.session() as session:
            last = session.get(Job, job_id).last_event_sequence
            now = datetime.now(timezone.utc)
            payload = {"phase": "prune", "step": 1, "note": "n" * 1000}
            for start in range(0, count, 5000):
                session.execute(insert(JobEvent), [
                    {"job_id": job_id, "sequence": last + 1 + i, "kind": "progress",
                     "payload": {**payload, "step": i}, "attempt": 0, "created_at": now}
                    for i in range(start, min(count, start + 5000))])
            session.execute(update(Job).where(Job.id == job_id)
                            .values(last_event_sequence=last + count))
        return last + count
    finally:
        db.dispose()


def test_watch_after_a_long_history_loads_none_of_it(load_server: Server) -> None:
    assert load_server.proc is not None
    job = load_server.jobs.SubmitJob(job_pb2.SubmitJobRequest(spec=edge_pruning_spec()),
                                     timeout=60)
    job_id = job.name.removeprefix("jobs/")
    last = add_history(load_server.database_url, job_id, HISTORY)
    db = Database(load_server.database_url)
    try:
        with PeakGrowth(load_server.proc.pid) as growth:
            stream = load_server.watch(job.name, after=last, timeout=120)
            received: list[job_pb2.JobEvent] = []
            reader = threading.Thread(target=lambda: received.extend(stream))
            reader.start()
            time.sleep(1.0)  # the stream waits at the end of the history
            EventRepo(db).append(job_id, "progress", {"phase": "prune", "step": 7})
            JobRepo(db).request_cancel(job_id)
            reader.join(timeout=60)
    finally:
        db.dispose()
    assert [e.sequence for e in received] == [last + 1, last + 2]
    assert received[0].progress.step == 7
    assert received[1].state_change.state == job_pb2.JOB_STATE_CANCELLED
    # The history is about 50 MB of stored JSON, several times that as Python objects.
    assert growth.grew < 25 * MIB, f"the watch grew the API by {growth.grew / MIB:.0f} MiB"
    replay = list(load_server.watch(job.name, after=last - 3, timeout=60))  # a page from storage
    assert [e.sequence for e in replay] == [last - 2, last - 1, last, last + 1, last + 2]


def test_many_watchers_on_many_jobs_get_every_event_once(load_server: Server) -> None:
    jobs = [load_server.jobs.SubmitJob(job_pb2.SubmitJobRequest(spec=edge_pruning_spec()),
                                       timeout=60).name for _ in range(200)]
    ids = [name.removeprefix("jobs/") for name in jobs]
    target = f"127.0.0.1:{load_server.port}"

    async def watch_all() -> list[list[int]]:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = job_pb2_grpc.JobServiceStub(channel)

            async def one(name: str) -> list[int]:
                stream = stub.WatchJob(job_pb2.WatchJobRequest(name=name), timeout=120)
                return [event.sequence async for event in stream]

            tasks = [asyncio.create_task(one(name)) for name in jobs]
            await asyncio.sleep(1.0)
            await asyncio.to_thread(_drive, load_server.database_url, ids)
            return await asyncio.gather(*tasks)

    seen = asyncio.run(watch_all())
    # PENDING, 3 progress events, CANCELLED: each once, in order, on every stream.
    assert all(s == [1, 2, 3, 4, 5] for s in seen), [s for s in seen if s != [1, 2, 3, 4, 5]][:3]


def _drive(url: str, ids: list[str]) -> None:
    """Three progress events on every job, spread over a few poll intervals, then cancel."""
    db = Database(url)
    try:
        events, jobs = EventRepo(db), JobRepo(db)
        for step in range(3):
            for job_id in ids:
                events.append(job_id, "progress", {"phase": "prune", "step": step})
        for job_id in ids:
            jobs.request_cancel(job_id)
    finally:
        db.dispose()


# ------------------------------------------------------------------------- caps and admission


@pytest.fixture
def fresh_server(backend: str, tmp_path: Path, tiny_gpt2_dir: Path) -> Iterator[Server]:
    """The API alone on an empty database: 50 pending jobs at most, 3 streams per client."""
    with database_url(backend, tmp_path) as url, running(
        tmp_path, url, tiny_gpt2_dir, workers=0, max_pending_jobs=50, max_watches_per_client=3,
    ) as server:
        yield server


def test_concurrent_submits_admit_exactly_the_cap(fresh_server: Server) -> None:
    spec = edge_pruning_spec()

    def submit(i: int) -> str:
        try:
            fresh_server.jobs.SubmitJob(job_pb2.SubmitJobRequest(
                spec=spec, request_id=f"r{i}"), timeout=120)
            return "OK"
        except grpc.RpcError as err:
            code, reason, _ = details(err)
            return f"{code}/{reason}"

    start = threading.Barrier(200)

    def at_once(i: int) -> str:
        start.wait()
        return submit(i)

    with ThreadPoolExecutor(200) as pool:
        outcomes = list(pool.map(at_once, range(200)))
    assert outcomes.count("OK") == 50
    assert set(outcomes) == {"OK", "RESOURCE_EXHAUSTED/QUEUE_FULL"}
    pending = fresh_server.jobs.ListJobs(job_pb2.ListJobsRequest(
        page_size=1000, states=[job_pb2.JOB_STATE_PENDING]), timeout=60)
    assert len(pending.jobs) == 50
    admitted = next(i for i, outcome in enumerate(outcomes) if outcome == "OK")
    assert submit(admitted) == "OK"  # a retried request still gets its job when full


def test_watch_streams_are_capped_per_client(fresh_server: Server) -> None:
    names = [fresh_server.jobs.SubmitJob(job_pb2.SubmitJobRequest(spec=edge_pruning_spec()),
                                         timeout=60).name for _ in range(4)]
    streams = [open_watch(fresh_server, name) for name in names[:3]]
    firsts = [next(stream) for stream in streams]  # each stream is open and has its PENDING
    assert [e.sequence for e in firsts] == [1, 1, 1]
    code, reason, _ = fails(lambda: next(fresh_server.watch(names[3], timeout=60)))
    assert (code, reason) == ("RESOURCE_EXHAUSTED", "TOO_MANY_WATCHES")
    streams[0].cancel()
    wait_for(lambda: _opens(fresh_server, names[3]), timeout=30, what="a free stream slot")


def open_watch(server: Server, name: str) -> grpc.Future:
    """A WatchJob call that can be cancelled."""
    return server.jobs.WatchJob(job_pb2.WatchJobRequest(name=name), timeout=60)


def _opens(server: Server, name: str) -> bool:
    stream = open_watch(server, name)
    try:
        return next(stream).sequence == 1
    except grpc.RpcError as err:
        if details(err)[1] != "TOO_MANY_WATCHES":
            raise
        return False
    finally:
        stream.cancel()
