"""The command line's deletes and what it prints about jobs and files, against the real server:
`jobs delete`, `circuits delete`, an evaluation's model in `jobs list`, exported files that
follow the umask; the async client's deletes."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from edgeprune.client import AsyncClient, Client, FailedPrecondition, NotFound
from tests.client.conftest import TINY_MODEL, ClientServer, tiny_job
from tests.client.test_cli import run


def test_jobs_list_shows_an_evaluations_model_not_its_circuit(
    capsys: pytest.CaptureFixture[str], client_server: ClientServer, client: Client,
    finished_circuit: str,
) -> None:
    job = client.wait(client.evaluate_circuit(finished_circuit, task="ioi", task_examples=8,
                                              batch_size=4).name)
    code, out, _ = run(capsys, client_server, "jobs", "list")
    assert code == 0
    header, *rows = [line.split() for line in out.splitlines()]
    assert header[:4] == ["JOB", "STATE", "MODEL", "METHOD"]
    (row,) = [r for r in rows if r[0] == job.name.removeprefix("jobs/")]
    assert row[2] == TINY_MODEL
    assert row[3:5] == ["EVALUATE", finished_circuit]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_files_follow_the_umask(
    capsys: pytest.CaptureFixture[str], client_server: ClientServer, finished_circuit: str,
    tmp_path: Path, umask: int,
) -> None:
    previous = os.umask(umask)
    try:
        path = tmp_path / f"circuit-{umask:o}.json"
        code, _, err = run(capsys, client_server, "circuits", "export", finished_circuit,
                           str(path), "--format", "json")
    finally:
        os.umask(previous)
    assert code == 0, err
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftover part


def test_jobs_delete_and_circuits_delete(
    capsys: pytest.CaptureFixture[str], client_server: ClientServer, client: Client,
) -> None:
    job = client.wait(client.submit(**tiny_job()).name)
    (circuit,) = job.result.circuits
    code, out, _ = run(capsys, client_server, "jobs", "delete", job.name)
    assert (code, out.strip()) == (0, f"deleted {job.name}")
    assert run(capsys, client_server, "jobs", "get", job.name)[0] == 4
    assert client.get_circuit(circuit).job == ""  # the circuit outlives its job
    code, out, _ = run(capsys, client_server, "circuits", "delete", circuit, "--json")
    assert code == 0 and '"deleted"' in out
    code, _, err = run(capsys, client_server, "circuits", "delete", circuit)
    assert code == 4 and "NOT_FOUND" in err


def test_the_async_client_deletes(client_server: ClientServer) -> None:
    async def scenario() -> None:
        async with AsyncClient(client_server.target) as client:
            job = await client.wait((await client.submit(**tiny_job(steps=3))).name)
            await client.delete_job(job.name)
            with pytest.raises(NotFound):
                await client.get_job(job.name)
            await client.delete_circuit(job.result.circuits[0])
            with pytest.raises(NotFound):
                await client.get_circuit(job.result.circuits[0])

    asyncio.run(scenario())


def test_deleting_an_unfinished_job_is_a_failed_precondition(client: Client) -> None:
    job = client.submit(**tiny_job(steps=1000))
    try:
        with pytest.raises(FailedPrecondition) as raised:
            client.delete_job(job.name)
        assert raised.value.reason == "JOB_NOT_FINISHED"
    finally:
        client.cancel(job.name)
