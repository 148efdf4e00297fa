"""Scaling out as on Kubernetes: one API process and two `edgeprune worker` processes share one
PostgreSQL database; 20 jobs all finish, each run exactly once (one claim, attempt 1, one result),
and both workers take part."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from edgeprune.v1 import job_pb2
from tests.service.harness import FAST, MODEL, Server, edge_pruning_spec, inline_examples
from tests.storage.databases import fresh_postgres_database

pytestmark = pytest.mark.postgres

N_JOBS = 20
START_TIMEOUT_S = 120.0


@contextlib.contextmanager
def worker(folder: Path, url: str, model_dir: Path) -> Iterator[subprocess.Popen[str]]:
    """`edgeprune worker` against ``url``; yields once its metrics endpoint is up."""
    flags = {**FAST, "data-dir": str(folder), "database-url": url, "metrics-port": "0"}
    flags.pop("workers")
    args = [f"--{k}={v}" for k, v in flags.items()] + [f"--model={MODEL}=hf:{model_dir}"]
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("EDGEPRUNE_") and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "worker.log", "a") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgeprune.service", "worker", *args],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
        )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(
                    f"worker exited ({proc.wait()}): {(folder / 'worker.log').read_text()[-3000:]}"
                )
            if line.startswith("{") and "metrics_port" in json.loads(line):
                break
            if time.monotonic() > deadline:
                raise TimeoutError("worker did not start")
        yield proc
    finally:
        proc.terminate()  # SIGTERM: drains (nothing is running by then)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def test_two_workers_and_an_api_run_every_job_exactly_once(
    tmp_path: Path, tiny_gpt2_dir: Path
) -> None:
    with fresh_postgres_database() as url:
        api = Server(tmp_path / "api", url, {MODEL: f"hf:{tiny_gpt2_dir}"}, workers=0).start()
        try:
            with (
                worker(tmp_path / "w1", url, tiny_gpt2_dir) as w1,
                worker(tmp_path / "w2", url, tiny_gpt2_dir) as w2,
            ):
                names = []
                for i in range(N_JOBS):
                    request = job_pb2.SubmitJobRequest(
                        spec=edge_pruning_spec(inline_examples(8), steps=4), request_id=f"job-{i}"
                    )
                    names.append(api.jobs.SubmitJob(request, timeout=30).name)
                # a retried submission is the same job, not a 21st
                again = job_pb2.SubmitJobRequest(
                    spec=edge_pruning_spec(inline_examples(8), steps=4), request_id="job-0"
                )
                assert api.jobs.SubmitJob(again, timeout=30).name == names[0]
                jobs = [api.wait_done(name, timeout=600) for name in names]
                # the image's HEALTHCHECK against the real API
                check = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "edgeprune.service.healthcheck",
                        "--port",
                        str(api.port),
                    ],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
                assert check.returncode == 0, check.stderr
                worker_ids = {f"{socket.gethostname()}:{p.pid}" for p in (w1, w2)}
        finally:
            assert api.stop() == 0

        assert all(j.state == job_pb2.JOB_STATE_SUCCEEDED for j in jobs), [j.state for j in jobs]
        assert len(set(names)) == N_JOBS
        with psycopg.connect(libpq(url)) as db:
            rows = db.execute("SELECT id, state, attempt, result FROM jobs").fetchall()
            claims = db.execute(
                "SELECT job_id, payload FROM job_events WHERE kind = 'state'"
            ).fetchall()
            circuits = db.execute("SELECT count(*) FROM circuits").fetchone()
    assert len(rows) == N_JOBS
    for job_id, state, attempt, result in rows:
        assert (state, attempt) == ("SUCCEEDED", 1), job_id
        assert len(result["circuits"]) == 1, job_id
    running = [
        (job_id, json_payload(p))
        for job_id, p in claims
        if json_payload(p).get("state") == "RUNNING"
    ]
    assert sorted(job_id for job_id, _ in running) == sorted(r[0] for r in rows), "one claim each"
    used = {payload["worker"] for _, payload in running}
    assert used == worker_ids, "both workers, and only they, ran jobs"
    assert circuits == (N_JOBS,)


def json_payload(value: object) -> dict:
    return value if isinstance(value, dict) else json.loads(str(value))
