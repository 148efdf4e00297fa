"""Servers for the service tests: real `edgeprune serve` subprocesses on loopback, on SQLite and
on a fresh PostgreSQL database (the storage tests' helper), with a tiny GPT-2 on the allow-list."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.harness import MODEL, Server
from tests.storage.databases import BACKENDS, fresh_postgres_database


@contextlib.contextmanager
def database_url(backend: str, folder: Path) -> Iterator[str]:
    """A new, empty database of ``backend`` (the server migrates it)."""
    if backend == "sqlite":
        yield f"sqlite:///{folder / 'edgeprune.db'}"
    else:
        with fresh_postgres_database() as url:
            yield url


@contextlib.contextmanager
def running(folder: Path, url: str, model_dir: Path, **settings: object) -> Iterator[Server]:
    server = Server(folder, url, {MODEL: f"hf:{model_dir}"}, **settings).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def api_server(backend: str, tmp_path_factory: pytest.TempPathFactory,
               tiny_gpt2_dir: Path) -> Iterator[Server]:
    """The API alone (no workers): jobs stay PENDING. Small limits to test them."""
    folder = tmp_path_factory.mktemp(f"api-{backend}")
    with database_url(backend, folder) as url, running(
        folder, url, tiny_gpt2_dir, workers=0, max_dataset_bytes=4096, max_steps=1000,
        max_inline_examples=50, max_sizes=4, max_pending_jobs=10_000,
    ) as server:
        yield server


@pytest.fixture(scope="session")
def live_server(backend: str, tmp_path_factory: pytest.TempPathFactory,
                tiny_gpt2_dir: Path) -> Iterator[Server]:
    """The API with one worker."""
    folder = tmp_path_factory.mktemp(f"live-{backend}")
    with database_url(backend, folder) as url, running(folder, url, tiny_gpt2_dir) as server:
        yield server
