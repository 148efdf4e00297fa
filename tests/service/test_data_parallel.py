"""A data-parallel Edge Pruning job through the service: 2 CPU processes under gloo, with progress,
checkpoints and cancellation, storing exactly one circuit."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from edgeprune.v1 import circuit_pb2, common_pb2, job_pb2
from tests.service.conftest import running
from tests.service.harness import Server, edge_pruning_spec, wait_for

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_gpt2_dir: Path) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("data-parallel")
    url = f"sqlite:///{folder / 'edgeprune.db'}"
    with running(folder, url, tiny_gpt2_dir, max_data_parallel=2, checkpoint_every=3) as server:
        yield server


def test_two_process_job_completes_with_one_circuit(server: Server) -> None:
    spec = edge_pruning_spec(steps=6)
    spec.data_parallel_workers = 2
    job = server.jobs.SubmitJob(job_pb2.SubmitJobRequest(spec=spec), timeout=30)
    events = list(server.watch(job.name, timeout=180))
    final = events[-1].state_change
    assert final.state == job_pb2.JOB_STATE_SUCCEEDED, server.log()
    steps = [e.progress.step for e in events if e.progress.phase == "prune"]
    assert steps[-1] == 6 and steps == sorted(steps)
    assert len(final.result.circuits) == 1
    circuits = server.circuits.ListCircuits(circuit_pb2.ListCircuitsRequest(), timeout=30)
    assert [c.name for c in circuits.circuits if c.job == job.name] == list(final.result.circuits)
    circuit = server.circuits.GetCircuit(circuit_pb2.GetCircuitRequest(
        name=final.result.circuits[0], view=common_pb2.VIEW_FULL), timeout=30)
    assert circuit.settings["distributed"] is True, "pruned by the data-parallel ranks"
    stored = server.jobs.GetJob(job_pb2.GetJobRequest(name=job.name), timeout=30)
    assert stored.spec.data_parallel_workers == 2 and "kl" in stored.result.metrics


def test_a_data_parallel_job_can_be_cancelled(server: Server) -> None:
    spec = edge_pruning_spec(steps=1000)
    spec.data_parallel_workers = 2
    job = server.jobs.SubmitJob(job_pb2.SubmitJobRequest(spec=spec), timeout=30)

    def pruning() -> bool:
        got = server.jobs.GetJob(job_pb2.GetJobRequest(name=job.name), timeout=30)
        return got.progress.phase == "prune" and got.progress.step >= 2

    wait_for(pruning, timeout=180, what="the ranks to start pruning")
    server.jobs.CancelJob(job_pb2.CancelJobRequest(name=job.name), timeout=30)
    done = server.wait_done(job.name, timeout=120)
    assert done.state == job_pb2.JOB_STATE_CANCELLED, server.log()
    assert done.progress.step < 1000
