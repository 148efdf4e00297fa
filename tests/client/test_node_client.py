"""A client in another language works from the .proto files alone: a Node.js script using
@grpc/grpc-js and @grpc/proto-loader (from the npm registry) submits a job, watches it and
fetches the circuit. Runs wherever `node` is installed (here and in CI)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import google.api
import grpc_tools
import pytest

from edgeprune.client import Client
from edgeprune.client._output import to_dict
from edgeprune.client._spec import job_spec
from tests.client.conftest import ClientServer, tiny_job

NODE_DIR = Path(__file__).parent / "node"
NODE = shutil.which("node")
NPM = shutil.which("npm")

pytestmark = pytest.mark.skipif(NODE is None or NPM is None, reason="node and npm are not installed")


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """Install the pinned npm packages once (npm ci from the lock file)."""
    modules = NODE_DIR / "node_modules"
    if not (modules / "@grpc" / "grpc-js").is_dir():
        command = [NPM, "ci" if (NODE_DIR / "package-lock.json").exists() else "install", "--no-audit", "--no-fund"]
        result = subprocess.run(command, cwd=NODE_DIR, capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, f"npm failed:\n{result.stdout}\n{result.stderr}"
    return modules


def test_node_client_submits_watches_and_fetches_the_circuit(
    node_modules: Path, client_server: ClientServer
) -> None:
    include = [Path(google.api.__path__[0]).parent.parent, Path(grpc_tools.__file__).parent / "_proto"]
    spec = to_dict(job_spec(**tiny_job()))
    env = {**os.environ, "EDGEPRUNE_PROTO_PATH": os.pathsep.join(map(str, include))}
    result = subprocess.run(
        [NODE, "client.js", client_server.target, json.dumps(spec)],
        cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["state"] == seen["final_state"] == "JOB_STATE_SUCCEEDED"
    assert seen["sequences"] == list(range(1, len(seen["sequences"]) + 1))
    assert "progress" in seen["kinds"]
    with Client(client_server.target) as client:  # the Python client sees the same circuit
        circuit = client.get_circuit(seen["circuit"], full=True)
    assert circuit.job == seen["job"] and circuit.edge_count == seen["edge_count"]
    assert [e.name for e in circuit.edges] == seen["edges"]
    assert seen["metrics"]["kl"] == pytest.approx(circuit.metrics["kl"])
