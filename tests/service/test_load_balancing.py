"""Client-side load balancing: one target that resolves to two real API servers on one database.

gRPC's ``ipv4:`` resolver takes a list of addresses, as DNS answers for a headless Service (one A
record per API pod); each server's /metrics counts the calls it handled.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest

from edgeprune.client import Client
from edgeprune.client.errors import InvalidArgument
from tests.service.conftest import database_url, running
from tests.service.harness import Server

CALLS = 40


def handled(server: Server, method: str) -> float:
    """grpc_server_handled_total of ``method`` (every code) on ``server``."""
    total = 0.0
    for line in server.metrics_text().splitlines():
        if line.startswith("grpc_server_handled_total{") and f'grpc_method="{method}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def spread(servers: list[Server], **options: object) -> list[float]:
    """Make CALLS GetServerInfo calls over one channel; the calls each server handled."""
    before = [handled(s, "GetServerInfo") for s in servers]
    target = "ipv4:" + ",".join(f"127.0.0.1:{s.port}" for s in servers)
    with Client(target, **options) as client:  # type: ignore[arg-type]
        for _ in range(CALLS):
            client.server_info()
    return [handled(s, "GetServerInfo") - b for s, b in zip(servers, before, strict=True)]


def test_round_robin_spreads_calls_over_every_server(
    backend: str, tmp_path: Path, tiny_gpt2_dir: Path
) -> None:
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(database_url(backend, tmp_path))
        servers = [stack.enter_context(running(tmp_path / name, url, tiny_gpt2_dir, workers=0))
                   for name in ("a", "b")]
        # gRPC's default (pick_first): every call over the first address that connects
        assert sorted(spread(servers)) == [0, CALLS]
        balanced = spread(servers, load_balancing="round_robin")
        assert sum(balanced) == CALLS and min(balanced) >= CALLS // 4, balanced


def test_load_balancing_comes_from_the_environment_and_is_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EDGEPRUNE_LOAD_BALANCING", "round_robin")
    with Client("dns:///localhost:1") as client:
        assert ("grpc.lb_policy_name", "round_robin") in client.settings.channel_options()
    monkeypatch.delenv("EDGEPRUNE_LOAD_BALANCING")
    with Client("dns:///localhost:1") as client:
        assert all(k != "grpc.lb_policy_name" for k, _ in client.settings.channel_options())
    with pytest.raises(InvalidArgument) as err:
        Client("localhost:1", load_balancing="random")
    assert err.value.field == "load_balancing"


def test_the_cli_refuses_an_unknown_policy() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "edgeprune.client.cli", "info", "--load-balancing=random"],
        capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2 and "--load-balancing" in out.stderr, out.stderr
