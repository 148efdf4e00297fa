"""AsyncClient: the same surface, awaited, against the same real server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from edgeprune.client import AsyncClient, InvalidArgument, JobCancelled, NotFound
from edgeprune.v1 import job_pb2
from tests.client.conftest import TINY_MODEL, ClientServer, tiny_job


def test_async_client_end_to_end(client_server: ClientServer, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with AsyncClient(client_server.target) as client:
            info = await client.server_info()
            assert TINY_MODEL in [m.name for m in info.models]

            job = await client.submit(labels={"test": "async"}, **tiny_job())
            events = [e async for e in client.watch(job.name)]
            assert [e.sequence for e in events] == list(range(1, len(events) + 1))
            assert events[-1].state_change.state == job_pb2.JOB_STATE_SUCCEEDED
            done = await client.wait(job.name)
            assert (await client.get_job(job.name)).state == job_pb2.JOB_STATE_SUCCEEDED
            assert job.name in [j.name async for j in client.list_jobs(labels={"test": "async"}, page_size=1)]

            name = done.result.circuits[0]
            circuit = await client.get_circuit(name, full=True)
            assert circuit.edge_count == len(circuit.edges)
            assert name in [c.name async for c in client.list_circuits(job=job.name)]
            path = await client.export_circuit(name, tmp_path / "c.json", format="json")
            assert json.loads(path.read_text())
            assert (await client.compare_circuits(name, name)).edge_jaccard == 1.0

            rows = [{"clean": "a b", "corrupted": "c b", "target": " x", "distractor": " y"}]
            dataset = await client.upload_dataset(rows * 3, display_name="tiny")
            assert (await client.get_dataset(dataset.name)).example_count == 3
            assert dataset.name in [d.name async for d in client.list_datasets()]
            await client.delete_dataset(dataset.name)

            # long enough that the cancel lands before an idle worker could finish it
            pending = await client.submit(priority=-100, **tiny_job(steps=10_000))
            await client.cancel(pending.name)
            with pytest.raises(JobCancelled):
                await client.wait(pending.name)
            with pytest.raises(NotFound):
                await client.get_job("jobs/missing")
            with pytest.raises(InvalidArgument) as caught:
                await client.submit(**tiny_job(model="not-on-the-list"))
            assert caught.value.field == "spec.model"

    asyncio.run(scenario())
