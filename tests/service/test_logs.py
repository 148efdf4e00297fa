"""log_format: json makes every line a real server and its worker write one JSON object."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from edgeprune.service import logs
from edgeprune.v1 import job_pb2
from tests.service.conftest import database_url, running
from tests.service.harness import edge_pruning_spec
from tests.service.test_jobs import submit


def test_a_json_server_and_its_worker_write_only_json_lines(
    backend: str, tmp_path: Path, tiny_gpt2_dir: Path
) -> None:
    with database_url(backend, tmp_path) as url:
        with running(tmp_path, url, tiny_gpt2_dir, log_format="json", log_level="INFO") as server:
            job = submit(server, edge_pruning_spec(steps=4))
            assert server.wait_done(job.name).state == job_pb2.JOB_STATE_SUCCEEDED
            pid = server.proc.pid if server.proc else 0
        lines = [line for line in server.log_path.read_text().splitlines() if line.strip()]
    assert lines
    records = []
    for line in lines:
        record = json.loads(line)  # fails on any text line, progress bar or traceback
        assert isinstance(record, dict), line
        assert {"time", "level", "logger", "message", "pid"} <= set(record), line
        records.append(record)
    job_id = job.name.removeprefix("jobs/")
    worker_lines = [r for r in records if r["logger"] == "edgeprune.service.worker"]
    assert any(f"job {job_id} attempt 1 started" in r["message"] for r in worker_lines), records
    # every line the worker logs while it runs the job names the job and the attempt
    started = next(r for r in worker_lines if "started" in r["message"])
    assert (started.get("job_id"), started.get("attempt")) == (job_id, 1), started
    # the worker is a process of its own, logging through the same setup
    assert {r["pid"] for r in worker_lines} - {pid}, records


def test_json_lines_carry_the_job_from_extra_or_context(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.setup("INFO", "json")
        log = logging.getLogger("edgeprune.test")
        log.info("plain")
        log.info("given", extra={"job_id": "j1", "attempt": 2})
        with logs.job_context("j2", 3):
            log.warning("inside %s", "context")
            log.info("override", extra={"job_id": "j9"})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
        logging.captureWarnings(False)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    plain, given, inside, override, failed = lines
    assert "job_id" not in plain and plain["message"] == "plain" and plain["level"] == "INFO"
    assert (given["job_id"], given["attempt"]) == ("j1", 2)
    assert (inside["job_id"], inside["attempt"], inside["message"]) == ("j2", 3, "inside context")
    assert (override["job_id"], override["attempt"]) == ("j9", 3)
    assert failed["level"] == "ERROR" and "ValueError: boom" in failed["exception"]
    assert plain["time"].endswith("+00:00") and plain["logger"] == "edgeprune.test"


def test_an_unknown_log_format_is_refused_by_name(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "edgeprune.service", "serve", "--log-format=xml",
         f"--data-dir={tmp_path}"],
        capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2, out.stderr
    assert "log_format" in out.stderr and "xml" in out.stderr
    assert "Traceback" not in out.stderr
