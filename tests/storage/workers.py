"""Worker processes for the queue tests (module-level so `spawn` can import them)."""

from __future__ import annotations

import time
from multiprocessing.connection import Connection
from typing import Any

from edgeprune.storage import Database, NewCircuit, Queue


def circuit_for(job_id: str, worker_id: str) -> NewCircuit:
    return NewCircuit(
        model="tiny",
        method="edge_pruning",
        edges=["tok->m0", "m0->logits"],
        total_edge_count=3,
        provenance={"worker": worker_id, "job": job_id},
    )


def drain_queue(
    url: str, worker_id: str, start: Any, results: Any, *, lease_s: float = 30.0,
    work_s: float = 0.002,
) -> None:
    """Wait for `start`, then claim and complete jobs until none is pending; put the
    (job_id, attempt) pairs it claimed on `results`."""
    db = Database(url)
    queue = Queue(db)
    start.wait()
    claimed = []
    while (claim := queue.claim(worker_id, lease_s)) is not None:
        claimed.append((claim.job_id, claim.attempt))
        queue.report(claim, "progress", {"worker": worker_id})
        time.sleep(work_s)
        queue.complete(claim, [circuit_for(claim.job_id, worker_id)], result={"worker": worker_id})
    results.put((worker_id, claimed))
    db.dispose()


def claim_and_hang(url: str, worker_id: str, lease_s: float, conn: Connection) -> None:
    """Claim one job, checkpoint it, send the Claim to the parent, then hang (to be killed)."""
    db = Database(url)
    queue = Queue(db)
    claim = queue.claim(worker_id, lease_s)
    if claim is not None:
        queue.checkpoint(claim, b"checkpoint of " + worker_id.encode())
    conn.send(claim)
    time.sleep(3600)


def rescue(url: str, worker_id: str, lease_s: float, timeout_s: float, conn: Connection) -> None:
    """Poll until a job can be claimed (after a dead worker's lease expires), complete it,
    and send back (claim, stored circuit ids)."""
    db = Database(url)
    queue = Queue(db)
    deadline = time.monotonic() + timeout_s
    while (claim := queue.claim(worker_id, lease_s)) is None:
        if time.monotonic() > deadline:
            conn.send(None)
            return
        time.sleep(0.1)
    _, circuits = queue.complete(claim, [circuit_for(claim.job_id, worker_id)])
    conn.send((claim, [c.id for c in circuits]))
    db.dispose()
