"""A real edgeprune server for the client tests: the grpc.aio API from
``edgeprune.service.create_server`` on loopback port 0, on its own event loop thread, one
worker process (the service's own Supervisor), SQLite in a temporary data directory, and a
tiny GPT-2 (tests/tiny_models.py) on the allow-list.

The API can be restarted on the same port mid-test (every open stream is cut), and more
API servers can be started on the same database, which is how watch resumption and retries
are tested without mocking anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from edgeprune.client import Client
from edgeprune.service.config import Config
from edgeprune.service.server import Supervisor, create_server

TINY_MODEL = "tiny"


def tiny_job(**overrides: Any) -> dict[str, Any]:
    """Keyword arguments of a job that finishes in a few seconds on the tiny model."""
    options: dict[str, Any] = {
        "model": TINY_MODEL, "task": "ioi", "task_examples": 16, "method": "edge_pruning",
        "sparsity": 0.5, "steps": 6, "batch_size": 8, "seed": 0,
    }
    options.update(overrides)
    return {k: v for k, v in options.items() if v is not None}


class ClientServer:
    """The API (restartable) and a worker on one SQLite database."""

    def __init__(self, data_dir: Path, model_dir: Path) -> None:
        self.config = Config(
            host="127.0.0.1", port=0, metrics_port=-1, data_dir=str(data_dir), workers=1,
            models={TINY_MODEL: f"hf:{model_dir}"}, progress_interval_s=0.05, poll_s=0.05,
            heartbeat_s=0.5, drain_grace_s=5.0,
        )
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.restarts = 0
        self._server, self.port = self._run(self._start_api(0))
        self._supervisor = Supervisor(self.config)
        self._workers = asyncio.run_coroutine_threadsafe(self._supervisor.run(), self.loop)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self, coroutine: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def _start_api(self, port: int, **changes: Any) -> tuple[grpc.aio.Server, int]:
        server, bound = create_server(dataclasses.replace(self.config, port=port, **changes))
        await server.start()
        return server, bound

    def restart_api(self) -> None:
        """Stop the API at once (open streams are cut) and start a new one on the same port."""
        self._run(self._server.stop(0))
        self._server, port = self._run(self._start_api(self.port))
        assert port == self.port
        self.restarts += 1

    @contextlib.contextmanager
    def extra_api(self, port: int = 0, **changes: Any) -> Iterator[str]:
        """Another API server on the same database (config ``changes`` applied), on ``port``,
        for the block's duration; yields its address."""
        server, bound = self._run(self._start_api(port, **changes))
        try:
            yield f"127.0.0.1:{bound}"
        finally:
            self._run(server.stop(0))

    @staticmethod
    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])

    def close(self) -> None:
        self._run(self._supervisor.drain(10.0))
        self._workers.cancel()
        self._run(self._server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="session")
def client_server(tmp_path_factory: pytest.TempPathFactory, tiny_gpt2_dir: Path) -> Iterator[ClientServer]:
    server = ClientServer(tmp_path_factory.mktemp("client-server"), tiny_gpt2_dir)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def client(client_server: ClientServer) -> Iterator[Client]:
    with Client(client_server.target) as c:
        yield c


@pytest.fixture(scope="session")
def finished_job(client_server: ClientServer) -> str:
    """The name of a job that SUCCEEDED on the tiny model."""
    with Client(client_server.target) as c:
        return c.wait(c.submit(**tiny_job()).name).name


@pytest.fixture(scope="session")
def finished_circuit(client_server: ClientServer, finished_job: str) -> str:
    """The name of that job's circuit."""
    with Client(client_server.target) as c:
        return c.get_job(finished_job).result.circuits[0]
