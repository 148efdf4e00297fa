"""The container HEALTHCHECK: `python -m edgeprune.service.healthcheck` against a real server."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


@pytest.fixture
def health_server() -> Iterator[tuple[int, health.HealthServicer]]:
    """A gRPC server on loopback port 0 serving grpc.health.v1."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, servicer
    finally:
        server.stop(grace=None)


def healthcheck(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeprune.service.healthcheck", "--timeout", "5", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_exit_code_follows_the_serving_status(
    health_server: tuple[int, health.HealthServicer],
) -> None:
    port, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert healthcheck(env={"EDGEPRUNE_PORT": str(port)}).returncode == 0  # the server's own port
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # draining
    out = healthcheck("--port", str(port))
    assert out.returncode == 1 and "NOT_SERVING" in out.stderr
    out = healthcheck("--port", str(port), "--service", "edgeprune.v1.Unknown")
    assert out.returncode == 1 and "NOT_FOUND" in out.stderr


def test_unreachable_server_fails_with_one_line(
    health_server: tuple[int, health.HealthServicer],
) -> None:
    port, _ = health_server
    out = healthcheck("--port", "1", "--timeout", "1")
    assert out.returncode == 1 and ("UNAVAILABLE" in out.stderr or "DEADLINE" in out.stderr)
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = healthcheck("--port", str(port), "--tls-ca", "/nonexistent.pem")
    assert out.returncode == 1 and "nonexistent" in out.stderr
