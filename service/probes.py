"""Worker liveness and readiness for Kubernetes probes: /livez and /readyz on the metrics port.

A hung job loop (a stuck collective, a driver call that never returns) leaves the process and
its metrics endpoint answering, so the probes read the loop itself. The loop *beats*: every
round of the idle poll (and every slice of a back-off wait), and while a job runs before every
step and every pass of the activation cache and the warm start, and at every progress report
(a data-parallel job only at its ranks' progress reports: it polls for a stop while it waits
on them, stuck or not).
The lease heartbeat does not count: it runs on a thread of its own and renews the lease just
as well while the job thread is stuck. /livez fails (503) when a worker's loop has not beaten
for ``liveness_timeout_s``; the one long call that beats nowhere inside is a model load (and
an evaluation pass), so the limit must stay above the slowest of those.

A worker is *ready* (/readyz 200) once its warm-up is done (the ``warm_models`` of the
allow-list loaded into its model cache; none by default, since workers load models lazily on
their first job) and its latest look at the queue reached the database: it can take a job now.

Each worker process writes its beat time and readiness to two gauges in prometheus' multiprocess
files (one sample per live pid), so the process that serves the probes reads every worker's:
`edgeprune worker` its own, `edgeprune serve` each of its worker processes (the body lists them).
"""

from __future__ import annotations

import glob
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

from prometheus_client.multiprocess import MultiProcessCollector

from edgeprune.service import metrics
from edgeprune.service.multiproc import MULTIPROC_ENV

BEAT_EVERY_S = 0.25  # beats closer together than this write nothing (the gauge's file is shared)


class LoopBeat:
    """One worker process's beat and readiness."""

    def __init__(self, worker_id: str) -> None:
        self.beat_gauge = metrics.WORKER_BEAT.labels(worker_id)
        self.ready_gauge = metrics.WORKER_READY.labels(worker_id)
        self.last = float("-inf")
        self.beat()
        self.ready(False)

    def beat(self) -> None:
        now = time.monotonic()
        if now - self.last >= BEAT_EVERY_S:
            self.last = now
            self.beat_gauge.set(time.time())

    def ready(self, ready: bool) -> None:
        self.ready_gauge.set(1 if ready else 0)


@dataclass(frozen=True)
class WorkerStatus:
    worker: str
    pid: str
    beat_age_s: float
    ready: bool


def workers() -> list[WorkerStatus]:
    """Every live worker process's status (from the multiprocess files, or this process's own
    gauges without them)."""
    folder = os.environ.get(MULTIPROC_ENV)
    if folder:
        # only the "liveall" gauges: the samples of processes that exited are gone with them
        families = MultiProcessCollector.merge(glob.glob(os.path.join(folder, "gauge_liveall_*.db")))
    else:
        families = [*metrics.WORKER_BEAT.collect(), *metrics.WORKER_READY.collect()]
    beats: dict[tuple[str, str], float] = {}
    ready: dict[tuple[str, str], float] = {}
    for family in families:
        for sample in family.samples:
            key = (sample.labels.get("worker", ""), sample.labels.get("pid", str(os.getpid())))
            if sample.name == "edgeprune_worker_last_beat_timestamp_seconds":
                beats[key] = sample.value
            elif sample.name == "edgeprune_worker_ready":
                ready[key] = sample.value
    now = time.time()
    return [WorkerStatus(worker, pid, round(max(now - beat, 0.0), 3), bool(ready.get((worker, pid))))
            for (worker, pid), beat in sorted(beats.items())]


def livez(limit_s: float) -> tuple[int, dict[str, Any]]:
    """503 when some worker's loop has not beaten for ``limit_s``; the body lists each."""
    statuses = workers()
    stalled = [s.worker for s in statuses if s.beat_age_s > limit_s]
    body = {"status": "stalled" if stalled else "ok", "limit_s": limit_s, "stalled": stalled,
            "workers": [asdict(s) for s in statuses]}
    return (503 if stalled else 200), body


def readyz(expected: int, limit_s: float) -> tuple[int, dict[str, Any]]:
    """200 when at least ``expected`` workers are ready (and not stalled)."""
    statuses = workers()
    ready = sum(s.ready and s.beat_age_s <= limit_s for s in statuses)
    body = {"status": "ready" if ready >= expected else "not ready", "ready": ready,
            "expected": expected, "workers": [asdict(s) for s in statuses]}
    return (200 if ready >= expected else 503), body


def routes(expected: int, limit_s: float) -> dict[str, metrics.Probe]:
    """The probe paths for `metrics.serve`."""
    return {"/livez": lambda: livez(limit_s), "/readyz": lambda: readyz(expected, limit_s)}
