"""A real `edgeprune serve` in a subprocess on loopback, and helpers to talk to it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc

from edgeprune.v1 import (
    circuit_pb2_grpc,
    common_pb2,
    dataset_pb2_grpc,
    job_pb2,
    job_pb2_grpc,
    server_pb2_grpc,
)

T = TypeVar("T")
START_TIMEOUT_S = 60.0
MODEL = "tiny"

# Fast settings: short leases, frequent polls and checkpoints, few steps by default.
FAST = {
    "host": "127.0.0.1", "port": "0", "metrics-port": "0", "workers": "1", "lease-s": "3",
    "heartbeat-s": "0.3", "poll-s": "0.05", "progress-interval-s": "0.02",
    "checkpoint-every": "5", "drain-grace-s": "15", "default-steps": "12",
    "default-examples": "16", "default-batch-size": "8", "log-level": "WARNING", "threads": "1",
    "device": "cpu",
}


def wait_for(predicate: Callable[[], T], *, timeout: float = 60.0, every: float = 0.05,
             what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


class Server:
    """`python -m edgeprune.service serve` with flags; stubs on a loopback channel."""

    def __init__(self, data_dir: Path, database_url: str, models: dict[str, str],
                 *, root_cert: bytes | None = None, **settings: Any) -> None:
        self.data_dir = data_dir
        self.database_url = database_url
        self.root_cert = root_cert
        flags = {**FAST, "data-dir": str(data_dir), "database-url": database_url,
                 **{k.replace("_", "-"): str(v) for k, v in settings.items()}}
        self.args = [f"--{k}={v}" for k, v in flags.items()]
        self.args += [f"--model={name}={ref}" for name, ref in models.items()]
        self.proc: subprocess.Popen[str] | None = None
        self.port = self.metrics_port = 0
        self.channel: grpc.Channel | None = None
        self.log_path = data_dir / "server.log"

    def start(self) -> Server:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("EDGEPRUNE_") and k != "PROMETHEUS_MULTIPROC_DIR"}
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "a")  # noqa: SIM115 - kept open for the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgeprune.service", "serve", *self.args],
            stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        ports: dict[str, int] = {}
        deadline = time.monotonic() + START_TIMEOUT_S
        assert self.proc.stdout is not None
        while "port" not in ports:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"server exited ({self.proc.wait()}): {self.log()}")
            if line.startswith("{"):
                ports.update(json.loads(line))
            if time.monotonic() > deadline:
                raise TimeoutError("server did not start")
        self.port, self.metrics_port = ports["port"], ports.get("metrics_port", 0)
        self.channel = self.connect(self.root_cert)
        grpc.channel_ready_future(self.channel).result(timeout=30)
        return self

    def connect(self, root_cert: bytes | None = None) -> grpc.Channel:
        """A channel to the server (TLS when ``root_cert`` is given)."""
        target = f"127.0.0.1:{self.port}" if root_cert is None else f"localhost:{self.port}"
        if root_cert is None:
            return grpc.insecure_channel(target)
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_cert))

    def log(self) -> str:
        return self.log_path.read_text()[-4000:] if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Signal the server and wait for it to exit; returns its exit code."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        return code

    @property
    def jobs(self) -> job_pb2_grpc.JobServiceStub:
        return job_pb2_grpc.JobServiceStub(self.channel)

    @property
    def circuits(self) -> circuit_pb2_grpc.CircuitServiceStub:
        return circuit_pb2_grpc.CircuitServiceStub(self.channel)

    @property
    def datasets(self) -> dataset_pb2_grpc.DatasetServiceStub:
        return dataset_pb2_grpc.DatasetServiceStub(self.channel)

    @property
    def info(self) -> server_pb2_grpc.ServerServiceStub:
        return server_pb2_grpc.ServerServiceStub(self.channel)

    def metrics_text(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=10) as response:
            return response.read().decode()

    # ------------------------------------------------------------------------------ jobs

    def watch(self, name: str, after: int = 0, *, timeout: float = 120.0) -> Iterator[job_pb2.JobEvent]:
        yield from self.jobs.WatchJob(job_pb2.WatchJobRequest(name=name, after_sequence=after),
                                      timeout=timeout)

    def wait_done(self, name: str, *, timeout: float = 120.0) -> job_pb2.Job:
        def final() -> job_pb2.Job | None:
            job = self.jobs.GetJob(job_pb2.GetJobRequest(name=name))
            return job if job.state >= job_pb2.JOB_STATE_SUCCEEDED else None

        return wait_for(final, timeout=timeout, every=0.1, what=f"{name} to finish")


def inline_examples(n: int = 12) -> job_pb2.DataSpec:
    """IOI-shaped examples whose clean and corrupted prompts tokenise to equal lengths."""
    names = ["Mary", "John", "Alice", "Bob", "Tom", "James", "Sarah", "Emma"]
    data = job_pb2.DataSpec()
    for i in range(n):
        a, b, c = names[i % 8], names[(i + 1) % 8], names[(i + 2) % 8]
        data.examples.examples.add(
            clean=f"When {a} and {b} went to the store, {b} gave a drink to",
            corrupted=f"When {a} and {b} went to the store, {c} gave a drink to",
            target=f" {a}", distractor=f" {b}")
    return data


def edge_pruning_spec(data: job_pb2.DataSpec | None = None, *, steps: int = 12,
                      sizes: tuple[float, ...] = (0.9,)) -> job_pb2.JobSpec:
    spec = job_pb2.JobSpec(model=MODEL, method=common_pb2.METHOD_EDGE_PRUNING, batch_size=4)
    spec.data.CopyFrom(data or inline_examples())
    spec.edge_pruning.steps = steps
    for sparsity in sizes:
        spec.sizes.add(edge_sparsity=sparsity)
    return spec


def short_examples_spec(i: int, n: int) -> job_pb2.JobSpec:
    """A job of `n` short inline examples, distinct per `i` (list and memory load cases)."""
    spec = edge_pruning_spec()
    spec.data.examples.ClearField("examples")
    for k in range(n):
        spec.data.examples.examples.add(clean=f"c{i} {k}", corrupted=f"d{i} {k}", target=" a",
                                        distractor=" b")
    return spec
