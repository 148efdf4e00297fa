"""MIB / EAP-IG circuit files through the CLI and the async client, against the real server: a
circuit exported with `circuits export --format mib` imports back (tok and pos as MIB's one
"input"), a bad
file is one line naming the field, and the async client imports idempotently."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from edgeprune.client import AsyncClient, Client
from tests.client.conftest import TINY_MODEL, ClientServer
from tests.client.test_cli import run


def test_a_circuit_exported_for_mib_imports_back(
    capsys: pytest.CaptureFixture[str], client_server: ClientServer, client: Client,
    finished_circuit: str, tmp_path: Path,
) -> None:
    path = tmp_path / "mib.json"
    code, _, err = run(capsys, client_server, "circuits", "export", finished_circuit, str(path),
                       "--format", "mib")
    assert code == 0, err
    mib = json.loads(path.read_text())
    assert {"cfg", "nodes", "edges"} <= set(mib)
    assert any(e["in_graph"] for e in mib["edges"].values())

    code, out, err = run(capsys, client_server, "circuits", "import", str(path), "--model",
                         TINY_MODEL, "--json")
    assert code == 0, err
    imported = json.loads(out)["name"]
    assert imported != finished_circuit
    compared = client.compare_circuits(finished_circuit, imported)
    # MIB has one "input" node for GPT-2's tok and pos embeddings: an edge from either comes back
    # from both, and every other edge comes back as it was
    assert compared.shared_edges and not compared.first_only_edges
    assert all(e.split("->")[0] in ("tok", "pos") for e in compared.second_only_edges)

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**mib, "edges": {"input->a9.h0<q>": {"score": 1.0, "in_graph": True}}}))
    code, _, err = run(capsys, client_server, "circuits", "import", str(bad), "--model", TINY_MODEL)
    assert code == 3 and "a9.h0" in err and "Traceback" not in err


def test_the_async_client_imports_once_per_request_id(
    client_server: ClientServer, client: Client, finished_circuit: str, tmp_path: Path,
) -> None:
    path = client.export_circuit(finished_circuit, tmp_path / "c.json", format="mib")

    async def scenario() -> tuple[str, str, int]:
        async with AsyncClient(client_server.target) as aclient:
            first = await aclient.import_circuit(path, model=TINY_MODEL, request_id="mib-once")
            again = await aclient.import_circuit(json.loads(path.read_text()), model=TINY_MODEL,
                                                 request_id="mib-once")
            return first.name, again.name, first.edge_count

    first, again, edges = asyncio.run(scenario())
    assert first == again and edges >= client.get_circuit(finished_circuit).edge_count
