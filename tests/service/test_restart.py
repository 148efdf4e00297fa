"""No job result is lost: a server stopped with SIGTERM mid-job hands the job back with a
checkpoint and the next server resumes it; a worker killed with SIGKILL loses its lease and
another worker resumes the job. Each job ends with exactly one stored circuit."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgeprune.storage import Database, JobRepo, JobState
from edgeprune.v1 import circuit_pb2, job_pb2, job_pb2_grpc
from tests.service.conftest import database_url
from tests.service.harness import MODEL, Server, edge_pruning_spec, wait_for

STEPS = 150


def start(folder: Path, url: str, model_dir: Path, workers: int = 1) -> Server:
    return Server(folder, url, {MODEL: f"hf:{model_dir}"}, checkpoint_every=5,
                  workers=workers).start()


def running_step(server: Server, name: str, at_least: int) -> int:
    def step() -> int:
        job = server.jobs.GetJob(job_pb2.GetJobRequest(name=name))
        assert job.state in (job_pb2.JOB_STATE_PENDING, job_pb2.JOB_STATE_RUNNING), job
        return job.progress.step if job.progress.phase == "prune" and \
            job.progress.step >= at_least else 0

    return wait_for(step, timeout=120, what=f"{name} to reach step {at_least}")


class Watching:
    """A job watch and a health watch, in threads, until the server goes away."""

    def __init__(self, server: Server, name: str) -> None:
        self.events: list[job_pb2.JobEvent] = []
        self.health: list[int] = []
        self.code = ""
        channel = server.connect()
        self.threads = [threading.Thread(target=self._job, args=(server, channel, name)),
                        threading.Thread(target=self._health, args=(channel,))]
        for thread in self.threads:
            thread.start()
        wait_for(lambda: self.events and self.health, timeout=30, what="the watches")

    def _job(self, server: Server, channel: grpc.Channel, name: str) -> None:
        stub = job_pb2_grpc.JobServiceStub(channel)
        try:
            for event in stub.WatchJob(job_pb2.WatchJobRequest(name=name), timeout=120):
                self.events.append(event)
        except grpc.RpcError as err:
            self.code = err.code().name

    def _health(self, channel: grpc.Channel) -> None:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            for reply in stub.Watch(health_pb2.HealthCheckRequest(), timeout=120):
                self.health.append(reply.status)
        except grpc.RpcError:
            pass

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=60)


def resumed_from(events: list[job_pb2.JobEvent]) -> int:
    """The first pruning step reported by the job's last attempt."""
    last_start = max(i for i, e in enumerate(events)
                     if e.state_change.state == job_pb2.JOB_STATE_RUNNING)
    return next(e.progress.step for e in events[last_start:] if e.progress.phase == "prune")


def one_circuit(server: Server, name: str) -> None:
    listed = server.circuits.ListCircuits(circuit_pb2.ListCircuitsRequest(job=name))
    assert len(listed.circuits) == 1


def test_jobs_survive_server_restart_and_worker_kill(backend: str, tmp_path: Path,
                                                     tiny_gpt2_dir: Path) -> None:
    with database_url(backend, tmp_path) as url:
        server = start(tmp_path / "first", url, tiny_gpt2_dir)
        db = Database(url)
        try:
            # SIGTERM mid-job: the job goes back to PENDING with a checkpoint.
            job = server.jobs.SubmitJob(job_pb2.SubmitJobRequest(spec=edge_pruning_spec(
                steps=STEPS)))
            job_id = job.name.removeprefix("jobs/")
            running_step(server, job.name, 12)
            watching = Watching(server, job.name)
            assert server.stop(signal.SIGTERM) == 0, server.log()
            watching.join()
            assert watching.code == "UNAVAILABLE"  # streams end; clients resume elsewhere
            assert health_pb2.HealthCheckResponse.NOT_SERVING in watching.health
            stored = JobRepo(db).get(job_id)
            assert stored.state == JobState.PENDING and stored.checkpoint_blob is not None
            assert stored.lease_owner is None

            # Two workers: when one is killed below, the other takes its job over.
            server = start(tmp_path / "second", url, tiny_gpt2_dir, workers=2)
            events = list(server.watch(job.name))
            assert events[-1].state_change.state == job_pb2.JOB_STATE_SUCCEEDED, server.log()
            assert [e.sequence for e in events] == list(range(1, len(events) + 1))
            after = watching.events[-1].sequence  # the watch resumes on the new server
            assert watching.events + list(server.watch(job.name, after=after)) == events
            assert resumed_from(events) > 10  # resumed from a checkpoint, not from step 1
            assert server.jobs.GetJob(job_pb2.GetJobRequest(name=job.name)).attempt == 2
            one_circuit(server, job.name)

            # SIGKILL of the worker mid-job: its lease expires, another worker resumes the job.
            job = server.jobs.SubmitJob(job_pb2.SubmitJobRequest(spec=edge_pruning_spec(
                steps=STEPS)))
            running_step(server, job.name, 12)
            owner = JobRepo(db).get(job.name.removeprefix("jobs/")).lease_owner
            assert owner is not None
            os.kill(int(owner.rsplit(":", 1)[1]), signal.SIGKILL)
            done = server.wait_done(job.name, timeout=180)
            assert done.state == job_pb2.JOB_STATE_SUCCEEDED, server.log()
            assert done.attempt == 2
            events = list(server.watch(job.name))
            assert resumed_from(events) > 10
            one_circuit(server, job.name)
        finally:
            server.stop()
            db.dispose()
