"""Storage benchmark, on SQLite and PostgreSQL.

- queue: job submissions/s, claims/s with one worker and with 4 worker processes;
- circuits: bulk load of 10,000 circuits x 1,000 edges (GPT-2 small's edge names), then
  p50 / p99 latency of "circuits of model M containing edge E" (one page of 50, newest
  first), also without the model filter and with two edges. Target: p99 < 50 ms.

PostgreSQL: a fresh `edgeprune_bench_<random>` database on EDGEPRUNE_BENCH_PG_URL
(default postgres@127.0.0.1:5432), dropped afterwards. Sizes can be reduced with
EDGEPRUNE_BENCH_CIRCUITS / EDGEPRUNE_BENCH_JOBS. Prints one JSON object per line and
writes them to bench/results/storage.jsonl. Takes about 15 minutes on 2 busy cores, most
of it loading the 10 million circuit edges.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import random
import secrets
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
from sqlalchemy import text

from edgeprune.storage import (
    CircuitFilter,
    CircuitRepo,
    Database,
    JobRepo,
    NewCircuit,
    NewJob,
    Queue,
)
from edgeprune.storage.db import normalize_url

PG_URL = os.environ.get("EDGEPRUNE_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
N_CIRCUITS = int(os.environ.get("EDGEPRUNE_BENCH_CIRCUITS", "10000"))
EDGES_PER_CIRCUIT = 1000
N_JOBS = int(os.environ.get("EDGEPRUNE_BENCH_JOBS", "1000"))
N_WORKERS = 4
N_QUERIES = 500
LOAD_BATCH = 100  # circuits per transaction
MODEL = "gpt2"


RESULTS = Path(__file__).parent / "results" / "storage.jsonl"
_lines: list[str] = []


def emit(**fields: object) -> None:
    line = json.dumps(fields)
    _lines.append(line)
    print(line, flush=True)


@contextlib.contextmanager
def backend(name: str) -> Iterator[str]:
    """A database URL for one backend, removed afterwards."""
    if name == "sqlite":
        with tempfile.TemporaryDirectory(prefix="edgeprune-bench-") as tmp:
            yield f"sqlite:///{Path(tmp) / 'bench.db'}"
        return
    admin = normalize_url(PG_URL)
    conninfo = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    database = f"edgeprune_bench_{secrets.token_hex(4)}"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    try:
        yield admin.set(database=database).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def _claim_all(url: str, worker_id: str, start: object, results: object) -> None:
    db = Database(url)
    queue = Queue(db)
    start.wait()  # type: ignore[attr-defined]
    count = 0
    while queue.claim(worker_id, 600) is not None:
        count += 1
    results.put(count)  # type: ignore[attr-defined]
    db.dispose()


def bench_queue(name: str, url: str, db: Database) -> None:
    jobs = JobRepo(db)
    start = time.perf_counter()
    for i in range(N_JOBS):
        jobs.create(NewJob(spec=b"\x08\x01", spec_json={"i": i}, request_id=f"r{i}"))
    elapsed = time.perf_counter() - start
    emit(backend=name, metric="job_submits_per_s", value=round(N_JOBS / elapsed, 1), jobs=N_JOBS)

    queue = Queue(db)
    start = time.perf_counter()
    claimed = 0
    while queue.claim("bench", 600) is not None:
        claimed += 1
    elapsed = time.perf_counter() - start
    emit(backend=name, metric="claims_per_s", workers=1, value=round(claimed / elapsed, 1),
         claims=claimed)

    for i in range(N_JOBS):
        jobs.create(NewJob(spec=b"\x08\x01", spec_json={"i": i}, request_id=f"s{i}"))
    ctx = multiprocessing.get_context("spawn")
    go, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(url, f"w{i}", go, results))
             for i in range(N_WORKERS)]
    for p in procs:
        p.start()
    time.sleep(5)  # let the workers import and connect before the clock starts
    start = time.perf_counter()
    go.set()
    counts = [results.get(timeout=600) for _ in procs]
    elapsed = time.perf_counter() - start
    for p in procs:
        p.join()
    emit(backend=name, metric="claims_per_s", workers=N_WORKERS,
         value=round(sum(counts) / elapsed, 1), claims=sum(counts), per_worker=counts)


def gpt2_edges() -> tuple[list[str], list[str]]:
    from edgeprune.engine.graph import Graph

    graph = Graph.build(12, 12, 12, True)
    return list(graph.edges), list(graph.writers)


def bench_circuits(name: str, db: Database) -> None:
    edges, _ = gpt2_edges()
    rng = random.Random(0)
    repo = CircuitRepo(db)
    start = time.perf_counter()
    for first in range(0, N_CIRCUITS, LOAD_BATCH):
        batch = []
        for _ in range(min(LOAD_BATCH, N_CIRCUITS - first)):
            kept = rng.sample(edges, EDGES_PER_CIRCUIT)
            nodes = sorted({e.split("->")[0] for e in kept})
            batch.append(NewCircuit(model=MODEL, method="edge_pruning", task="ioi", edges=kept,
                                    total_edge_count=len(edges), nodes=nodes))
        repo.create_many(batch)
    load_s = time.perf_counter() - start
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE" if name == "postgresql" else "ANALYZE"))
    emit(backend=name, metric="circuit_load", circuits=N_CIRCUITS,
         edges_per_circuit=EDGES_PER_CIRCUIT, seconds=round(load_s, 1),
         edge_rows_per_s=round(N_CIRCUITS * EDGES_PER_CIRCUIT / load_s))

    queries = {
        "contains_edge_model": lambda e, e2: CircuitFilter(model=MODEL, contains_edges=[e]),
        "contains_edge_any_model": lambda e, e2: CircuitFilter(contains_edges=[e]),
        "contains_two_edges_model": lambda e, e2: CircuitFilter(model=MODEL, contains_edges=[e, e2]),
    }
    for label, make_filter in queries.items():
        latencies, found = [], []
        for _ in range(N_QUERIES):
            f = make_filter(rng.choice(edges), rng.choice(edges))
            start = time.perf_counter()
            page = repo.list(f, page_size=50)
            latencies.append((time.perf_counter() - start) * 1000)
            found.append(len(page.items))
        latencies.sort()
        emit(backend=name, metric="list_circuits_ms", query=label, queries=N_QUERIES,
             p50=round(statistics.median(latencies), 2),
             p99=round(latencies[int(0.99 * (len(latencies) - 1))], 2),
             mean_results=round(statistics.fmean(found), 1))


def main() -> None:
    emit(metric="machine", cpus=os.cpu_count(), load_avg_1m=round(os.getloadavg()[0], 1))
    for name in ("sqlite", "postgresql"):
        with backend(name) as url:
            db = Database(url)
            db.migrate()
            bench_queue(name, url, db)
            bench_circuits(name, db)
            db.dispose()
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text("\n".join(_lines) + "\n")


if __name__ == "__main__":
    main()
