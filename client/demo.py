"""``edgeprune demo``: the whole service on one machine, in a few minutes.

It starts ``edgeprune serve`` as a subprocess on the embedded SQLite database in a
temporary data directory, submits an Edge Pruning job for IOI on ``smollm2-135m``
(small enough for a 2-core CPU), follows it with the progress bar, runs EAP at the
same number of edges, prints both circuits' metrics side by side, writes the Edge
Pruning circuit's SVG and stops the server. Everything goes through the public
client, as any other program would use the service.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgeprune.v1 import circuit_pb2, common_pb2

from ._output import enum_name, print_table
from ._sync import Client
from .errors import EdgepruneError, Unavailable
from .progress import JobProgress

__all__ = ["add_demo_arguments", "run_demo"]

_METRICS = ("kl", "faithfulness", "logit_diff", "accuracy", "pairwise_accuracy")


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's flags; the defaults finish in a few minutes on 2 CPU cores."""
    parser.add_argument("--model", default="smollm2-135m", help="model on the allow-list")
    parser.add_argument("--task", default="ioi", help="built-in task")
    parser.add_argument("--examples", type=int, default=40, help="task examples generated for training")
    # The method's settings are the server's defaults unless given: the demo submits what a
    # user who names only the model, the data, the method and the size would.
    parser.add_argument("--steps", type=int, default=None, help="Edge Pruning steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sparsity", type=float, default=0.98, help="target edge sparsity")
    parser.add_argument("--warm-start", default=None, choices=("eap_ig", "none"),
                        help="initial masks: EAP-IG scores (the server's default) or every edge on")
    parser.add_argument("--lr", type=float, default=None, help="mask and lambda learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--svg", default="edgeprune-demo.svg", help="where to write the circuit's SVG")
    parser.add_argument("--target", default=None, help="use this running server instead of starting one")
    parser.add_argument("--data-dir", default=None, help="server data directory (default: a temporary one)")
    parser.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to wait for the server")


@contextmanager
def _server(data_dir: Path, ready_timeout: float) -> Iterator[str]:
    """Run ``edgeprune serve`` (API + one worker) in a subprocess; yields its address."""
    log_path = data_dir / "server.log"
    command = [
        sys.executable, "-m", "edgeprune.client.cli", "serve",
        "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1",
        "--data-dir", str(data_dir), "--workers", "1",
    ]
    print(f"starting the server: edgeprune serve --port 0 --data-dir {data_dir}", flush=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        target = _wait_ready(process, ready_timeout, log_path)
        yield target
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        print(f"server stopped (exit code {process.returncode})", flush=True)


def _wait_ready(process: subprocess.Popen[bytes], timeout: float, log: Path) -> str:
    """The server's address once it answers: its bound port is the ``{"port": N}`` line it
    prints on start; then GetServerInfo must succeed."""
    deadline = time.monotonic() + timeout
    port = None
    while port is None:
        if process.poll() is not None:
            raise Unavailable(f"the server exited with code {process.returncode}")
        if time.monotonic() > deadline:
            raise Unavailable(f"the server did not start within {timeout:.0f} s (log: {log})")
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith('{"port"'):
                port = int(json.loads(line)["port"])
        time.sleep(0.2)
    target = f"127.0.0.1:{port}"
    with Client(target, timeout=max(1.0, deadline - time.monotonic())) as client:
        info = client.server_info()
    models = ", ".join(m.name for m in info.models)
    print(f"server {info.version} ready at {target}; models: {models}", flush=True)
    return target


def _run_job(client: Client, title: str, **options: Any) -> circuit_pb2.Circuit:
    """Submit a job, draw its progress, return the job's first circuit (FULL view)."""
    job = client.submit(labels={"source": "demo"}, **options)
    print(f"\n{title}: {job.name}", flush=True)
    printer = JobProgress()
    try:
        job = client.wait(job.name, on_event=printer)
    finally:
        printer.close()
    return client.get_circuit(job.result.circuits[0], full=True)


def _compare(circuits: list[circuit_pb2.Circuit]) -> None:
    columns = [("METHOD", lambda c: enum_name(common_pb2.Method, c.method, "METHOD_"))]
    columns.append(("EDGES", lambda c: f"{c.edge_count}/{c.total_edge_count}"))
    columns.append(("SPARSITY", lambda c: f"{c.edge_sparsity:.2%}"))
    for key in _METRICS:
        columns.append((key.upper(), lambda c, key=key: f"{c.metrics[key]:.4f}" if key in c.metrics else "-"))
    print("\nheld-out metrics at the same circuit size:")
    print_table(circuits, columns)


def _demo(target: str, args: argparse.Namespace) -> int:
    started = time.monotonic()
    data = {"model": args.model, "task": args.task, "task_examples": args.examples, "seed": args.seed}
    with Client(target, timeout=60.0) as client:
        given = {k: v for k, v in (("steps", args.steps), ("lr", args.lr), ("lambda_lr", args.lr),
                                   ("warm_start", args.warm_start)) if v is not None}
        settings = ", ".join(f"{k} {v}" for k, v in given.items()) or "the server's defaults"
        pruned = _run_job(
            client,
            f"Edge Pruning of {args.task} on {args.model} (sparsity {args.sparsity}, {settings})",
            method="edge_pruning", sparsity=args.sparsity, batch_size=args.batch_size,
            **given, **data,
        )
        baselines = [
            _run_job(client, f"{name} at the same size ({pruned.edge_count} edges)",
                     method=method, edges=pruned.edge_count, batch_size=args.batch_size, **data)
            for name, method in (("EAP-IG", "eap_ig"), ("EAP", "eap"))
        ]
        _compare([pruned, *baselines])
        svg = client.export_circuit(pruned.name, args.svg, format="svg")
    print(f"\nEdge Pruning circuit {pruned.name}: {pruned.node_count} nodes; picture written to {svg}")
    print(f"demo finished in {time.monotonic() - started:.0f} s")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """Entry point of ``edgeprune demo``."""
    if args.target:
        return _demo(args.target, args)
    with tempfile.TemporaryDirectory(prefix="edgeprune-demo-") as tmp:
        data_dir = Path(args.data_dir or tmp)
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            with _server(data_dir, args.ready_timeout) as target:
                return _demo(target, args)
        except EdgepruneError:
            log = data_dir / "server.log"
            if log.exists():
                tail = log.read_text(errors="replace").splitlines()[-20:]
                print("last lines of the server log:\n  " + "\n  ".join(tail), file=sys.stderr)
            raise

