"""Worker probes and queue metrics over real processes: `edgeprune worker` and `edgeprune serve`
with two workers on SQLite.

- a standalone worker's /readyz fails until its warm-up model is loaded and the database
  answers its claim; while another process holds SQLite's write lock its job loop is blocked,
  so /livez fails within the limit while its own /metrics still answers;
- `serve` reports each of its workers: a stopped one fails /livez and /readyz alone, and
  passes again once it runs on;
- a job left pending shows its age, and the stopped worker's expired lease is counted.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeprune.storage import Database, JobRepo
from edgeprune.v1 import job_pb2
from tests.service.conftest import running
from tests.service.harness import MODEL, Server, edge_pruning_spec, wait_for

LIVENESS_S = 2.0


def probe(port: int, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def answers(port: int, path: str, code: int) -> dict[str, Any] | None:
    """The probe's body when it answers ``code``, else None (for `wait_for`)."""
    got, body = probe(port, path)
    return body if got == code else None


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in a /metrics page, or None."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}(?:\{{{re.escape(want)}\}})? (\S+)$" if want else \
        rf"^{re.escape(name)} (\S+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_gpt2_dir: Path) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("probes")
    # the long jobs below only keep their workers busy: few progress events and checkpoints
    with running(folder, f"sqlite:///{folder / 'edgeprune.db'}", tiny_gpt2_dir, workers=2,
                 lease_s=3, liveness_timeout_s=LIVENESS_S, warm_models=MODEL,
                 progress_interval_s=0.5, checkpoint_every=10_000) as server:
        yield server


def test_a_blocked_worker_loop_fails_livez_while_metrics_answer(
        tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'edgeprune.db'}"
    Database(url).migrate()
    flags = {"database-url": url, "data-dir": str(tmp_path), "metrics-port": "0",
             "poll-s": "0.05", "liveness-timeout-s": str(LIVENESS_S), "warm-models": MODEL,
             "log-level": "INFO", "threads": "1", "device": "cpu",
             "model": f"{MODEL}=hf:{tiny_gpt2_dir}"}
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("EDGEPRUNE_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    # another process's writer holds SQLite's lock: the worker's first claim waits behind it
    stalled = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
    stalled.execute("BEGIN IMMEDIATE")
    log = open(tmp_path / "worker.log", "w")  # noqa: SIM115 - closed below
    worker = subprocess.Popen(
        [sys.executable, "-m", "edgeprune.service", "worker",
         *[f"--{k}={v}" for k, v in flags.items()]],
        stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    try:
        assert worker.stdout is not None
        port = json.loads(worker.stdout.readline())["metrics_port"]
        code, body = probe(port, "/readyz")
        assert code == 503 and body["ready"] == 0, body  # starting: not ready

        body = wait_for(lambda: answers(port, "/livez", 503), timeout=60, every=0.2,
                        what="/livez to fail")
        (status,) = body["workers"]
        assert status["beat_age_s"] > LIVENESS_S and not status["ready"], body
        assert body["stalled"] == [status["worker"]]
        # the process is fine: its metrics endpoint answers, and the warm-up model is loaded
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
            text = page.read().decode()
        assert metric(text, "edgeprune_model_load_seconds_count", model=MODEL) == 1.0, text
        assert probe(port, "/readyz")[0] == 503

        stalled.execute("ROLLBACK")  # the database answers again
        wait_for(lambda: probe(port, "/readyz")[0] == 200, timeout=30, every=0.1,
                 what="/readyz to succeed")
        code, body = probe(port, "/livez")
        assert code == 200 and body["workers"][0]["beat_age_s"] < LIVENESS_S, body
    finally:
        stalled.close()
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
        log.close()


def owner_pid(url: str, name: str) -> int:
    def running_owner() -> str | None:
        db = Database(url)
        try:
            job = JobRepo(db).get(name.removeprefix("jobs/"))
        finally:
            db.dispose()
        return job.lease_owner if job.progress.get("step") else None

    return int(wait_for(running_owner, timeout=60, what=f"{name} to run").rsplit(":", 1)[1])


def test_serve_reports_each_worker_and_counts_an_expired_lease(server: Server) -> None:
    port = server.metrics_port
    body = wait_for(lambda: answers(port, "/readyz", 200), timeout=60, every=0.1,
                    what="both workers ready")
    assert body["ready"] == 2 and len(body["workers"]) == 2, body
    submit = server.jobs.SubmitJob
    first = submit(job_pb2.SubmitJobRequest(spec=edge_pruning_spec(steps=50_000)))
    hung = owner_pid(server.database_url, first.name)
    second = submit(job_pb2.SubmitJobRequest(spec=edge_pruning_spec(steps=50_000)))
    owner_pid(server.database_url, second.name)
    waiting = submit(job_pb2.SubmitJobRequest(spec=edge_pruning_spec()))  # no worker is free
    submitted = time.monotonic()
    try:
        os.kill(hung, signal.SIGSTOP)  # the process is there, its job loop goes nowhere

        body = wait_for(lambda: answers(port, "/livez", 503), timeout=30, every=0.2,
                        what="/livez to fail")
        assert [w["pid"] for w in body["workers"] if w["worker"] in body["stalled"]] == [
            str(hung)], body
        assert len(body["workers"]) == 2, body
        code, ready = probe(port, "/readyz")
        assert code == 503 and ready["ready"] == 1, ready
        text = server.metrics_text()  # served by the API process: answers
        age = metric(text, "edgeprune_queue_oldest_pending_seconds")
        assert age is not None and age >= time.monotonic() - submitted - 1.0, text
        assert metric(text, "edgeprune_queue_pending_jobs") == 1.0

        # its lease expires (its heartbeat thread is stopped too): the other worker, once
        # free, reclaims the job and counts the expiry
        server.jobs.CancelJob(job_pb2.CancelJobRequest(name=second.name))
        wait_for(lambda: metric(server.metrics_text(), "edgeprune_lease_expiries_total",
                                state="PENDING") == 1.0,
                 timeout=60, every=0.2, what="the expired lease to be counted")
        os.kill(hung, signal.SIGCONT)  # it finds its lease lost, drops the job and beats again
        body = wait_for(lambda: answers(port, "/livez", 200), timeout=30, every=0.2,
                        what="/livez to recover")
        assert len(body["workers"]) == 2, body
    finally:
        os.kill(hung, signal.SIGCONT)
        for job in (first, second, waiting):
            server.jobs.CancelJob(job_pb2.CancelJobRequest(name=job.name))
