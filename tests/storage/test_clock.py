"""Leases run on the database's clock: a worker process whose own clock is 60 s behind or
ahead (libfaketime, Debian's `faketime` package) neither loses a fresh lease nor keeps an
expired one.

PostgreSQL only: SQLite is embedded, so every process that opens its file runs on one host
and reads one clock; there the lease is measured on that clock.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import text

from edgeprune.storage import Database, JobRepo, JobState, NewJob, Queue
from edgeprune.storage.models import Base

SKEW_S = 60.0
LEASE_S = 4.0
# Claims the next job with LEASE_S in a process of its own and prints its clock and claim.
CLAIM_SCRIPT = """
import json, sys, time
from edgeprune.storage import Database, Queue
db = Database(sys.argv[1])
claim = Queue(db).claim("skewed-worker", float(sys.argv[2]))
print(json.dumps({"clock": time.time(), "job": claim.job_id, "attempt": claim.attempt}))
db.dispose()
"""


def faketime_env(skew_s: float) -> dict[str, str]:
    """The environment that runs a process with its clock moved by ``skew_s`` seconds."""
    libraries = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not libraries:
        pytest.fail("libfaketime is missing: apt-get install faketime (.ci/run does)",
                    pytrace=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPRUNE_")}
    # Only wall-clock time moves: monotonic timers (sleeps, heartbeats) stay true.
    env.update(LD_PRELOAD=libraries[0], FAKETIME=f"{skew_s:+.0f}s",
               FAKETIME_DONT_FAKE_MONOTONIC="1", FAKETIME_NO_CACHE="1")
    return env


@pytest.fixture
def pg(postgres_url: str) -> Iterator[Database]:
    db = Database(postgres_url)
    tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
    with db.engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    yield db
    db.dispose()


def claim_in_skewed_process(url: str, skew_s: float) -> dict[str, float | str]:
    done = subprocess.run([sys.executable, "-c", CLAIM_SCRIPT, url, str(LEASE_S)],
                          env=faketime_env(skew_s), capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    claimed = json.loads(done.stdout)
    # the process really ran on a skewed clock (else this test proves nothing)
    assert abs(float(claimed["clock"]) - (time.time() + skew_s)) < 10, claimed
    return claimed


@pytest.mark.parametrize("skew_s", [-SKEW_S, SKEW_S], ids=["behind", "ahead"])
def test_a_lease_lasts_lease_s_on_the_database_clock_whatever_the_worker_clock(
        pg: Database, skew_s: float) -> None:
    job_id = JobRepo(pg).create(NewJob(spec=b"", spec_json={})).id
    claimed = claim_in_skewed_process(pg.url.render_as_string(hide_password=False), skew_s)
    assert claimed["job"] == job_id and claimed["attempt"] == 1
    queue = Queue(pg)

    # Fresh: nobody may take it over (a clock behind used to make it expired at once).
    with pg.session(write=False) as session:
        server_now = pg.now(session)
    job = JobRepo(pg).get(job_id)
    assert job.lease_expires_at is not None
    assert 0 < (job.lease_expires_at - server_now).total_seconds() <= LEASE_S
    assert queue.reclaim_expired() == []
    assert queue.claim("other-worker", LEASE_S) is None

    # Silent past LEASE_S: reclaimed (a clock ahead used to keep it SKEW_S longer).
    time.sleep(LEASE_S + 0.5)
    assert queue.reclaim_expired() == [job_id]
    assert JobRepo(pg).get(job_id).state == JobState.PENDING
