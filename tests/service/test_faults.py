"""The service under clock skew and storage faults, against real `edgeprune serve` and
`edgeprune worker` processes:

- a worker whose clock is 60 s behind keeps its job (leases run on the database's clock);
- a full SQLite database (its `max_page_count` reached) answers UNAVAILABLE to the API and
  costs the worker nothing but time: it lives on, and the job succeeds once space is free;
- a process holding SQLite's write lock makes API writes fail fast (UNAVAILABLE with a retry
  delay) while workers wait it out;
- a corrupted checkpoint restarts the attempt from step 0 with a CHECKPOINT_CORRUPT warning;
- health turns NOT_SERVING while the database refuses connections, SERVING when it is back.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import psycopg
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from sqlalchemy import update
from sqlalchemy.engine import make_url

from edgeprune.service import healthcheck
from edgeprune.storage import Database, JobRepo, Queue
from edgeprune.storage.models import Blob
from edgeprune.v1 import circuit_pb2, job_pb2
from tests.service.conftest import database_url, running
from tests.service.harness import MODEL, Server, edge_pruning_spec, inline_examples, wait_for
from tests.storage.databases import _libpq_conninfo, fresh_postgres_database, pg_admin_url
from tests.storage.test_clock import faketime_env

LEASE_S = 3.0


def submit(server: Server, spec: job_pb2.JobSpec, **kwargs: object) -> job_pb2.Job:
    return server.jobs.SubmitJob(job_pb2.SubmitJobRequest(spec=spec), **kwargs)


def get(server: Server, name: str) -> job_pb2.Job:
    return server.jobs.GetJob(job_pb2.GetJobRequest(name=name))


def at_step(server: Server, name: str, at_least: int) -> job_pb2.Job:
    def reached() -> job_pb2.Job | None:
        job = get(server, name)
        assert job.state in (job_pb2.JOB_STATE_PENDING, job_pb2.JOB_STATE_RUNNING), job
        ok = job.progress.phase == "prune" and job.progress.step >= at_least
        return job if ok else None

    return wait_for(reached, timeout=120, what=f"{name} to reach step {at_least}")


def retry_info(err: grpc.RpcError) -> error_details_pb2.RetryInfo | None:
    status = rpc_status.from_call(err)
    for detail in status.details if status else []:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info
    return None


def assert_unavailable(err: grpc.RpcError, *secrets: str) -> None:
    """UNAVAILABLE with a retry delay, and nothing of the database's address in the message."""
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    info = retry_info(err)
    assert info is not None and info.retry_delay.ToTimedelta().total_seconds() > 0, err
    for secret in secrets:
        assert secret not in err.details(), err.details()


# ------------------------------------------------------------------------------- clock skew


class Worker:
    """`edgeprune worker` in its own process, optionally on a skewed clock."""

    def __init__(self, folder: Path, url: str, model_dir: Path, *, skew_s: float = 0.0) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.log_path = folder / "worker.log"
        flags = {"database-url": url, "data-dir": str(folder), "lease-s": str(LEASE_S),
                 "heartbeat-s": "0.3", "poll-s": "0.05", "progress-interval-s": "0.02",
                 "checkpoint-every": "5", "metrics-port": "-1", "log-level": "INFO",
                 "threads": "1", "device": "cpu", "model": f"{MODEL}=hf:{model_dir}"}
        env = (faketime_env(skew_s) if skew_s else
               {k: v for k, v in os.environ.items() if not k.startswith("EDGEPRUNE_")})
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgeprune.service", "worker",
                 *[f"--{k}={v}" for k, v in flags.items()]],
                stdout=log, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_polling(self) -> None:
        wait_for(lambda: " on cpu" in self.log(), timeout=60, what="the worker to start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.mark.postgres
def test_a_worker_whose_clock_is_60s_behind_keeps_its_job(tmp_path: Path,
                                                          tiny_gpt2_dir: Path) -> None:
    with database_url("postgresql", tmp_path) as url, running(
            tmp_path / "api", url, tiny_gpt2_dir, workers=0) as server:
        skewed = Worker(tmp_path / "skewed", url, tiny_gpt2_dir, skew_s=-60)
        honest = None
        try:
            skewed.wait_polling()
            # Long enough to outlast the honest worker's start and its reclaim rounds on any
            # machine; cancelled once they are over.
            job = submit(server, edge_pruning_spec(steps=50_000))
            at_step(server, job.name, 1)
            # Another worker on a true clock: it would see the skewed worker's lease expired
            # a minute ago if leases were measured on each worker's own clock.
            honest = Worker(tmp_path / "honest", url, tiny_gpt2_dir)
            honest.wait_polling()
            time.sleep(2 * LEASE_S)  # several of its reclaim rounds
            during = get(server, job.name)
            assert during.state == job_pb2.JOB_STATE_RUNNING, (during, skewed.log())
            assert during.attempt == 1
            assert "started" not in honest.log(), honest.log()
            server.jobs.CancelJob(job_pb2.CancelJobRequest(name=job.name))
            done = server.wait_done(job.name, timeout=300)
            assert done.state == job_pb2.JOB_STATE_CANCELLED, (done, skewed.log(), honest.log())
            assert done.attempt == 1
            events = list(server.watch(job.name))
            assert not [e for e in events if e.state_change.state == job_pb2.JOB_STATE_PENDING
                        and e.sequence > 1], events
        finally:
            skewed.stop()
            if honest is not None:
                honest.stop()


# ------------------------------------------------------------------------- SQLite write lock


def sqlite_path(url: str) -> str:
    return make_url(url).database or ""


def test_api_writes_fail_fast_behind_a_stalled_sqlite_writer_and_workers_wait(
        tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    url = f"sqlite:///{tmp_path / 'edgeprune.db'}"
    with running(tmp_path, url, tiny_gpt2_dir, workers=0) as server:
        submit(server, edge_pruning_spec(), timeout=60)  # tokenizer and model shape cached
        stalled = sqlite3.connect(sqlite_path(url), isolation_level=None,
                                  check_same_thread=False)  # a timer thread releases it below
        stalled.execute("BEGIN IMMEDIATE")  # another process's writer, stalled with the lock
        try:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                submit(server, edge_pruning_spec(), timeout=60)
            waited = time.monotonic() - started
            assert_unavailable(caught.value, str(tmp_path))
            assert "locked" in caught.value.details()
            assert waited < 10, waited  # a short busy timeout, not the workers' 30 s
            # reads do not need the lock
            server.jobs.ListJobs(job_pb2.ListJobsRequest(), timeout=10)
        finally:
            stalled.execute("ROLLBACK")
        assert submit(server, edge_pruning_spec(), timeout=10).name

        # A worker's writes wait for the lock to be released (here after 2 s) and succeed.
        worker_db = Database(url)
        try:
            stalled.execute("BEGIN IMMEDIATE")
            threading.Timer(2.0, stalled.execute, args=("ROLLBACK",)).start()
            started = time.monotonic()
            claim = Queue(worker_db).claim("patient-worker", LEASE_S)
            assert claim is not None
            assert time.monotonic() - started >= 1.5
        finally:
            worker_db.dispose()
            stalled.close()


# ------------------------------------------------------------------------- a full database


def fill(path: str, max_pages: int) -> str:
    """Grow the database past ``max_pages`` with one unreferenced blob (a connection without
    the page limit, as another program filling the disk); returns its key."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
        data = os.urandom((max_pages - pages + 16) * page_size)
        key = hashlib.sha256(data).hexdigest()
        conn.execute("INSERT INTO blobs (sha256, size, media_type, data, created_at) "
                     "VALUES (?, ?, 'application/octet-stream', ?, CURRENT_TIMESTAMP)",
                     (key, len(data), data))
        assert conn.execute("PRAGMA freelist_count").fetchone()[0] == 0
        return key
    finally:
        conn.close()


def free(path: str, key: str) -> None:
    """Delete the filler: its pages go to SQLite's free list, where the server can write."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("DELETE FROM blobs WHERE sha256 = ?", (key,))
    finally:
        conn.close()


def big_spec() -> job_pb2.JobSpec:
    """A spec larger than a page: storing it needs new pages, which a full database lacks."""
    return edge_pruning_spec(inline_examples(48), steps=12)


def test_a_full_sqlite_database_is_unavailable_and_the_worker_survives_it(
        tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    path = tmp_path / "edgeprune.db"
    Database(f"sqlite:///{path}").migrate()
    max_pages = sqlite3.connect(path).execute("PRAGMA page_count").fetchone()[0] + 4000
    url = f"sqlite:///{path}?max_page_count={max_pages}"
    with running(tmp_path, url, tiny_gpt2_dir, max_attempts=50,
                 max_inline_examples=64) as server:
        job = submit(server, edge_pruning_spec(steps=150))
        at_step(server, job.name, 12)
        filler = fill(str(path), max_pages)
        try:
            wait_for(lambda: "disk is full" in server.log(), timeout=60,
                     what="the worker to meet the full disk")
            with pytest.raises(grpc.RpcError) as caught:
                submit(server, big_spec(), timeout=30)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, server.log()
            assert_unavailable(caught.value, str(tmp_path))
        finally:
            free(str(path), filler)
        done = server.wait_done(job.name, timeout=300)
        assert done.state == job_pb2.JOB_STATE_SUCCEEDED, (done, server.log())
        listed = server.circuits.ListCircuits(circuit_pb2.ListCircuitsRequest(job=job.name))
        assert len(listed.circuits) == 1
        assert "exited with" not in server.log()  # the worker process never died
        assert submit(server, big_spec(), timeout=30).name


# ------------------------------------------------------------------------ a corrupt checkpoint


def corrupt_blob(url: str, sha256: str) -> None:
    """Flip the stored bytes of a blob in place (its key, their old hash, stays)."""
    db = Database(url)
    try:
        with db.session() as session:
            data = bytearray(session.get(Blob, sha256).data)
            data[len(data) // 2] ^= 0xFF
            session.execute(update(Blob).where(Blob.sha256 == sha256).values(data=bytes(data)))
    finally:
        db.dispose()


def test_a_corrupt_checkpoint_restarts_the_attempt_from_step_0(
        backend: str, tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    with database_url(backend, tmp_path) as url, running(
            tmp_path, url, tiny_gpt2_dir, lease_s=LEASE_S) as server:
        job = submit(server, edge_pruning_spec(steps=60))
        job_id = job.name.removeprefix("jobs/")
        at_step(server, job.name, 12)  # two checkpoints stored
        db = Database(url)
        try:
            owner = JobRepo(db).get(job_id).lease_owner
            assert owner is not None
            os.kill(int(owner.rsplit(":", 1)[1]), signal.SIGKILL)  # nothing more is written
            checkpoint = JobRepo(db).get(job_id).checkpoint_blob
            assert checkpoint is not None
        finally:
            db.dispose()
        corrupt_blob(url, checkpoint)  # before the lease expires and a new worker claims it

        done = server.wait_done(job.name, timeout=300)
        assert done.state == job_pb2.JOB_STATE_SUCCEEDED, (done, server.log())
        assert done.attempt == 2
        events = list(server.watch(job.name))
        warnings = [e.warning for e in events if e.HasField("warning")
                    and e.warning.reason == "CHECKPOINT_CORRUPT"]
        assert len(warnings) == 1, events
        assert "step 0" in warnings[0].message
        second = max(i for i, e in enumerate(events)
                     if e.state_change.state == job_pb2.JOB_STATE_RUNNING)
        steps = [e.progress.step for e in events[second:] if e.progress.phase == "prune"]
        # every step again, not resumed at 10 (progress is throttled: step 1 may go unreported)
        assert steps[0] < 5 and steps[-1] == 60


# --------------------------------------------------------------------------- health follows DB


def health(server: Server) -> health_pb2_grpc.HealthStub:
    return health_pb2_grpc.HealthStub(server.channel)


def status_of(server: Server) -> int:
    return health(server).Check(health_pb2.HealthCheckRequest(), timeout=10).status


@pytest.mark.postgres
def test_health_is_not_serving_while_the_database_refuses_connections(
        tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    admin = _libpq_conninfo(pg_admin_url())
    with fresh_postgres_database() as url, running(tmp_path, url, tiny_gpt2_dir,
                                                   workers=0) as server:
        name = make_url(url).database
        assert status_of(server) == health_pb2.HealthCheckResponse.SERVING
        listed = health(server).List(health_pb2.HealthListRequest(), timeout=10)
        assert "edgeprune.v1.JobService" in listed.statuses
        assert {s.status for s in listed.statuses.values()} == {
            health_pb2.HealthCheckResponse.SERVING}

        with psycopg.connect(admin, autocommit=True) as conn:  # the database goes away
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = %s", (name,))
        try:
            wait_for(lambda: status_of(server) == health_pb2.HealthCheckResponse.NOT_SERVING,
                     timeout=30, every=0.2, what="NOT_SERVING")
            listed = health(server).List(health_pb2.HealthListRequest(), timeout=10)
            assert {s.status for n, s in listed.statuses.items() if n != "liveness"} == {
                health_pb2.HealthCheckResponse.NOT_SERVING}
            # the process itself is fine: a liveness probe must not restart it
            assert listed.statuses["liveness"].status == health_pb2.HealthCheckResponse.SERVING
            assert healthcheck.main(["--port", str(server.port)]) == 1
            with pytest.raises(grpc.RpcError) as caught:
                submit(server, edge_pruning_spec(), timeout=30)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, server.log()
            assert_unavailable(caught.value, name, "127.0.0.1", "5432", "postgres")
        finally:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')

        wait_for(lambda: status_of(server) == health_pb2.HealthCheckResponse.SERVING,
                 timeout=30, every=0.2, what="SERVING again")
        assert healthcheck.main(["--port", str(server.port)]) == 0
        assert submit(server, edge_pruning_spec(), timeout=30).name
