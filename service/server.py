"""The grpc.aio API server, its worker processes, and draining on SIGTERM.

`create_server(config)` builds a server bound to ``config.port`` (0 picks a free port) and returns
``(server, port)``; `serve(config)` is what `edgeprune serve` runs: migrate the database, start the
metrics endpoint and `config.workers` worker processes, serve until SIGTERM/SIGINT, then drain:

1. health turns NOT_SERVING (load balancers stop sending calls);
2. workers get SIGTERM: each running job stops before its next step, checkpoints and goes back to
   PENDING (its lease released), so another worker resumes it;
3. in-flight calls get ``drain_grace_s`` to finish, then the server stops.

Workers are separate interpreters started with ``python -m edgeprune.service worker`` (never forked
from this process once gRPC runs); the supervisor restarts one that dies.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgeprune.service import cleanup, metrics, probes, reflection, tracing
from edgeprune.service.config import Config, check_transport
from edgeprune.service.handlers import CircuitHandler, DatasetHandler, JobHandler, ServerHandler
from edgeprune.service.handlers.plots import PlotHandler
from edgeprune.service.health import Health
from edgeprune.service.interceptors import (
    AuthInterceptor,
    MetricsInterceptor,
    RequestCheckInterceptor,
    TracingInterceptor,
)
from edgeprune.service.principals import Principals
from edgeprune.service.servicers import (
    CircuitServicer,
    DatasetServicer,
    JobServicer,
    ServerServicer,
)
from edgeprune.service.watch import EventHub
from edgeprune.storage import (
    BlobStore,
    CircuitRepo,
    Database,
    DatasetRepo,
    EventRepo,
    JobRepo,
    Queue,
)
from edgeprune.v1 import (
    circuit_pb2,
    circuit_pb2_grpc,
    dataset_pb2,
    dataset_pb2_grpc,
    job_pb2,
    job_pb2_grpc,
    server_pb2,
    server_pb2_grpc,
)

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    dataset_pb2.DESCRIPTOR.services_by_name["DatasetService"].full_name,
    job_pb2.DESCRIPTOR.services_by_name["JobService"].full_name,
    circuit_pb2.DESCRIPTOR.services_by_name["CircuitService"].full_name,
    server_pb2.DESCRIPTOR.services_by_name["ServerService"].full_name,
)
WORKER_RESTART_DELAY_S = 1.0
MAX_RESTART_DELAY_S = 60.0
DB_THREADS = 16  # storage's default pool: 5 connections + 10 overflow
API_BUSY_TIMEOUT_S = 3.0


@dataclass
class Api:
    """A built (not yet started) API server and what it holds."""

    server: grpc.aio.Server
    port: int
    health: Health
    hub: EventHub
    db: Database

    async def set_serving(self, serving: bool) -> None:
        await self.health.set_serving(serving)


def build(config: Config, db: Database) -> Api:
    """Build the server on an existing database; call inside the event loop that will run it."""
    limits = config.limits
    check_transport(config)  # library callers skip load_config: refuse plaintext tokens here too
    interceptors: list[grpc.aio.ServerInterceptor] = [MetricsInterceptor()]
    principals = Principals(config.auth_tokens)
    if tracing.enabled():  # outside authentication: a refused call is traced too
        interceptors.append(TracingInterceptor(principals))
    if principals.enabled:
        interceptors.append(AuthInterceptor(principals))
        if not config.tls:
            log.warning("insecure: bearer tokens are accepted without TLS; anyone on the network "
                        "path can read and replay them")
    interceptors.append(RequestCheckInterceptor())  # innermost: after authentication
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", limits.max_message_bytes),
            ("grpc.max_send_message_length", limits.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    jobs, datasets, circuits = JobRepo(db), DatasetRepo(db), CircuitRepo(db)
    job_handler = JobHandler(jobs, Queue(db, max_attempts=config.max_attempts), datasets, circuits,
                             config)
    hub = EventHub(EventRepo(db), jobs, poll_s=config.poll_s,
                   max_watches=limits.max_watches_per_client)
    dataset_pb2_grpc.add_DatasetServiceServicer_to_server(
        DatasetServicer(DatasetHandler(datasets, config), principals), server)
    plots = PlotHandler(jobs, EventRepo(db), circuits, config)
    job_pb2_grpc.add_JobServiceServicer_to_server(JobServicer(job_handler, hub, principals, plots),
                                                  server)
    circuit_pb2_grpc.add_CircuitServiceServicer_to_server(
        CircuitServicer(CircuitHandler(circuits, BlobStore(db), config), job_handler, principals),
        server)
    server_pb2_grpc.add_ServerServiceServicer_to_server(ServerServicer(ServerHandler(config)),
                                                        server)
    health = Health(SERVICE_NAMES)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable(  # as grpc.reflection.v1 and v1alpha
        server, (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))
    address = f"{config.host}:{config.port}"
    if config.tls:
        credentials = grpc.ssl_server_credentials(
            [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())])
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    return Api(server=server, port=port, health=health, hub=hub, db=db)


def open_database(config: Config) -> Database:
    """Connect and migrate (every start; concurrent starts are serialised by storage).

    Calls answer UNAVAILABLE after API_BUSY_TIMEOUT_S behind another process's SQLite write
    lock: a stalled writer must not hold the API's storage threads for a worker's long wait.
    """
    db = Database(config.effective_database_url, busy_timeout_s=API_BUSY_TIMEOUT_S)
    db.migrate()
    return db


def create_server(config: Config) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server for ``config`` (database migrated), bound but not started."""
    api = build(config, open_database(config))
    return api.server, api.port


# ---------------------------------------------------------------------------------- workers


class Supervisor:
    """Starts ``config.workers`` worker processes, restarts those that die, drains them."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.procs: list[subprocess.Popen[bytes]] = []
        self.draining = False
        # Workers never check tokens; what they need (the database URL with its password) goes
        # down a pipe, never into a file or argv where it would outlive or leak out of a crash.
        worker_config = dataclasses.replace(config, auth_tokens=(), auth_token_file="")
        self.worker_config = worker_config.to_json().encode()

    def spawn(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgeprune.service", "worker", "--config-stdin"],
            stdin=subprocess.PIPE,
            env={**os.environ, "EDGEPRUNE_PARENT_PID": str(os.getpid())},
        )
        assert proc.stdin is not None
        try:
            proc.stdin.write(self.worker_config)
            proc.stdin.close()
        except BrokenPipeError:  # it died at once; `run` notices and restarts it
            log.warning("worker process %d exited before reading its config", proc.pid)
        log.info("started worker process %d", proc.pid)
        return proc

    async def run(self) -> None:
        """Keep the workers alive until `drain`; a worker that keeps dying is restarted
        after a doubling delay (up to MAX_RESTART_DELAY_S)."""
        self.procs = [self.spawn() for _ in range(self.config.workers)]
        delay = WORKER_RESTART_DELAY_S
        while not self.draining:
            for i, proc in enumerate(self.procs):
                if proc.poll() is not None and not self.draining:
                    log.warning("worker %d exited with %s; restarting in %.0f s", proc.pid,
                                proc.returncode, delay)
                    metrics.process_dead(proc.pid)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, MAX_RESTART_DELAY_S)
                    if not self.draining:
                        self.procs[i] = self.spawn()
            if all(p.poll() is None for p in self.procs):
                delay = max(WORKER_RESTART_DELAY_S, delay * 0.99)  # calm again: shrink back
            await asyncio.sleep(0.2)

    async def drain(self, grace_s: float) -> None:
        """SIGTERM every worker; wait up to ``grace_s``, then SIGKILL what is left."""
        self.draining = True
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = asyncio.get_running_loop().time() + grace_s
        for proc in self.procs:
            while proc.poll() is None and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            if proc.poll() is None:
                log.error("worker %d did not drain in %.0f s; killing it", proc.pid, grace_s)
                proc.kill()
                proc.wait()
            metrics.process_dead(proc.pid)


# ------------------------------------------------------------------------------------ serve


async def serve(config: Config) -> None:
    """Run the API (and workers) until SIGTERM or SIGINT, then drain."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tracing.enable(config, "edgeprune-api")
    # Storage calls run in threads; enough of them to keep the database connection pool busy.
    loop.set_default_executor(ThreadPoolExecutor(max_workers=DB_THREADS,
                                                 thread_name_prefix="storage"))
    db = await asyncio.to_thread(open_database, config)
    queue = Queue(db)
    metrics_server = None
    if config.metrics_port >= 0:
        metrics_server, metrics_port = metrics.serve(
            config.metrics_port, config.metrics_host, queue.pending_count,
            oldest_age=queue.oldest_pending_age,
            probes=probes.routes(config.workers, config.liveness_timeout_s))
        log.info("metrics on http://%s:%d/metrics", config.metrics_host, metrics_port)
        _announce("metrics_port", metrics_port)
    api = build(config, db)  # binds the port first: a taken port must not leave workers behind
    supervisor = Supervisor(config)
    supervisor_task = asyncio.create_task(supervisor.run()) if config.workers else None
    await api.server.start()
    await api.set_serving(True)
    probe = asyncio.create_task(api.health.watch_database(db))
    upkeep = (asyncio.create_task(cleanup.run_forever(config, db))
              if config.cleanup_interval_s > 0 else None)
    log.info("edgeprune API on %s:%d (%s)", config.host, api.port, "TLS" if config.tls else "plaintext")
    _announce("port", api.port)

    await stop.wait()

    log.info("draining (grace %.0f s)", config.drain_grace_s)
    probe.cancel()
    if upkeep is not None:
        upkeep.cancel()
    await api.set_serving(False)
    await api.hub.close()
    if supervisor_task is not None:
        await asyncio.gather(supervisor.drain(config.drain_grace_s),
                             api.server.stop(config.drain_grace_s))
        supervisor_task.cancel()
    else:
        await api.server.stop(config.drain_grace_s)
    if metrics_server is not None:
        metrics_server.shutdown()
    db.dispose()
    tracing.shutdown()
    log.info("stopped")


def _announce(key: str, value: int) -> None:
    """One machine-readable line on stdout (tests and scripts read the bound ports)."""
    print(json.dumps({key: value}), flush=True)
