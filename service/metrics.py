"""Prometheus metrics, served on their own HTTP port.

Workers are separate processes, so every metric is kept in prometheus-client's multiprocess mode:
each process writes its samples to files in ``PROMETHEUS_MULTIPROC_DIR`` and the API process
aggregates them when scraped. `prepare_multiprocess_dir` must run before prometheus_client is
first imported in the process tree (`serve_main` / `worker_main` call it first thing), and the
supervisor calls `process_dead` for each worker that exits so its live gauges disappear.

Families:
  grpc_server_started_total, grpc_server_handled_total, grpc_server_handling_seconds
      (grpc_type, grpc_service, grpc_method [, grpc_code]) — by the metrics interceptor
  edgeprune_jobs_submitted_total{kind}, edgeprune_jobs_finished_total{kind,state},
  edgeprune_job_duration_seconds{kind,state}, edgeprune_queue_pending_jobs,
  edgeprune_queue_oldest_pending_seconds, edgeprune_lease_expiries_total{state},
  edgeprune_steps_per_second, edgeprune_step_seconds, edgeprune_model_load_seconds{model},
  edgeprune_workers, edgeprune_workers_busy, edgeprune_device_memory_bytes{device},
  edgeprune_worker_last_beat_timestamp_seconds{worker,pid}, edgeprune_worker_ready{worker,pid}

The metrics port also answers the worker probes /livez and /readyz (see probes.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from http import HTTPStatus
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily

from edgeprune.service.multiproc import MULTIPROC_ENV

GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
JOB_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)

GRPC_STARTED = Counter("grpc_server_started_total", "RPCs started on the server.", GRPC_LABELS)
GRPC_HANDLED = Counter("grpc_server_handled_total",
                       "RPCs completed on the server, regardless of success or failure.",
                       (*GRPC_LABELS, "grpc_code"))
GRPC_SECONDS = Histogram("grpc_server_handling_seconds",
                         "Response latency of RPCs handled by the server, in seconds.",
                         (*GRPC_LABELS, "grpc_code"), buckets=LATENCY_BUCKETS)

JOBS_SUBMITTED = Counter("edgeprune_jobs_submitted_total", "SubmitJob and EvaluateCircuit calls "
                         "that returned a job (a repeated request_id counts again).", ("kind",))
JOBS_FINISHED = Counter("edgeprune_jobs_finished_total", "Jobs that reached a final state.",
                        ("kind", "state"))
JOB_SECONDS = Histogram("edgeprune_job_duration_seconds",
                        "Time from a job's first start to its final state.", ("kind", "state"),
                        buckets=JOB_BUCKETS)
STEPS_PER_SECOND = Gauge("edgeprune_steps_per_second",
                         "Optimisation steps per second, summed over the live workers.",
                         multiprocess_mode="livesum")
STEP_SECONDS = Histogram("edgeprune_step_seconds", "Time of one pruning step.",
                         buckets=STEP_BUCKETS)
MODEL_LOAD_SECONDS = Histogram("edgeprune_model_load_seconds",
                               "Time to load a model into a worker (cache misses only).",
                               ("model",), buckets=LOAD_BUCKETS)
WORKERS = Gauge("edgeprune_workers", "Live worker processes.", multiprocess_mode="livesum")
WORKERS_BUSY = Gauge("edgeprune_workers_busy", "Workers running a job.",
                     multiprocess_mode="livesum")
LEASE_EXPIRIES = Counter("edgeprune_lease_expiries_total",
                         "Running jobs whose lease expired (their worker died or stalled), by "
                         "the state the job went to: PENDING (run again), FAILED (attempts "
                         "used up) or CANCELLED.", ("state",))
# One sample per worker process ("liveall" adds its pid): the probes read them across processes.
WORKER_BEAT = Gauge("edgeprune_worker_last_beat_timestamp_seconds",
                    "When the worker's job loop last showed progress (Unix time).", ("worker",),
                    multiprocess_mode="liveall")
WORKER_READY = Gauge("edgeprune_worker_ready",
                     "1 when the worker is warm and its last look at the queue reached the "
                     "database.", ("worker",), multiprocess_mode="liveall")
DEVICE_MEMORY = Gauge("edgeprune_device_memory_bytes",
                      "Memory in use on each device by the live workers (CUDA: allocated "
                      "tensors; CPU: resident set size).", ("device",),
                      multiprocess_mode="livesum")


class _QueueCollector:
    """Reads the queue depth and the oldest pending job's age from the database at scrape
    time (every API process reports the same values)."""

    def __init__(self, pending: Callable[[], int],
                 oldest_age: Callable[[], float] | None = None) -> None:
        self.pending = pending
        self.oldest_age = oldest_age

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("edgeprune_queue_pending_jobs", "Jobs waiting for a worker.")
        try:
            family.add_metric([], float(self.pending()))
        except Exception:  # noqa: BLE001 - a scrape must not fail because the DB is down
            return
        yield family
        if self.oldest_age is None:
            return
        age = GaugeMetricFamily("edgeprune_queue_oldest_pending_seconds",
                                "Seconds since the oldest pending job was submitted (0: none "
                                "pending).")
        try:
            age.add_metric([], float(self.oldest_age()))
        except Exception:  # noqa: BLE001 - as above
            return
        yield age


def registry(pending: Callable[[], int] | None = None,
             oldest_age: Callable[[], float] | None = None) -> CollectorRegistry:
    """A registry that aggregates every process's samples (plus the queue's depth and age)."""
    out = CollectorRegistry()
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.MultiProcessCollector(out)
    else:  # single process (a library user who never called prepare_multiprocess_dir)
        from prometheus_client import REGISTRY

        out = REGISTRY
    if pending is not None:
        out.register(_QueueCollector(pending, oldest_age))
    return out


#: A probe: (HTTP status, JSON body), called on each request of its path.
Probe = Callable[[], tuple[int, dict[str, Any]]]


def serve(port: int, host: str, pending: Callable[[], int] | None = None, *,
          oldest_age: Callable[[], float] | None = None,
          probes: Mapping[str, Probe] | None = None) -> tuple[object, int]:
    """Start the /metrics HTTP endpoint in a thread, with ``probes`` on their own paths
    (``{"/livez": ...}``); returns (http server, bound port)."""
    httpd, _ = start_http_server(port, addr=host, registry=registry(pending, oldest_age))
    if probes:
        httpd.set_app(_with_probes(httpd.get_app(), dict(probes)))
    return httpd, httpd.server_port


def _with_probes(metrics_app: Callable[..., Any], probes: dict[str, Probe]) -> Callable[..., Any]:
    """A WSGI app that answers the probe paths and hands every other path to prometheus."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        probe = probes.get(environ.get("PATH_INFO", ""))
        if probe is None:
            return metrics_app(environ, start_response)
        code, body = probe()
        data = json.dumps(body).encode()
        start_response(f"{code} {HTTPStatus(code).phrase}",
                       [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        return [data]

    return app


def process_dead(pid: int) -> None:
    """Forget the live gauges of a worker process that exited."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)


def device_memory(device: str) -> float:
    """Bytes in use on ``device`` by this process."""
    if device.startswith("cuda"):
        import torch

        return float(torch.cuda.memory_allocated(device))
    try:
        with open("/proc/self/statm") as statm:
            return float(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0.0
