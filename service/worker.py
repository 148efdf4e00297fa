"""A worker process: claim jobs from the database queue and run them on the engine.

One job at a time. While a job runs, a heartbeat thread extends the lease every
``heartbeat_s`` and learns of cancellation; the job checks the flags before every step, so a
cancel or a drain (SIGTERM) takes effect within one step. Drained jobs checkpoint and go back to
PENDING; a job whose lease was lost (the worker stalled and another took over) is dropped without
writing anything — the attempt number fences every write. Results are stored with SUCCEEDED in one
transaction (`Queue.complete`); the mask blobs go in first (content-addressed, so a retry
reuses them).

The database may go away (connection lost, SQLite locked or its disk full): the worker never dies
of it. A running job is released (PENDING again, resumed from its last checkpoint), or, when even
that write fails, left to its lease, which expires and lets the job be claimed again; the claim loop
backs off, doubling its wait, until the database answers. A checkpoint that cannot be read
(corrupt bytes) restarts the attempt from step 0 with a warning event instead of failing the job.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from edgeprune.service import logs, metrics, probes, runner, tracing, translate
from edgeprune.service.config import Config
from edgeprune.service.converters import EVENT_PROGRESS, EVENT_WARNING
from edgeprune.service.errors import FailedPrecondition, classify
from edgeprune.service.job_checkpoint import load_checkpoint
from edgeprune.service.memory_check import worker_memory_budget
from edgeprune.service.model_cache import ModelCache, resolve_device
from edgeprune.storage import (
    BlobStore,
    CircuitRepo,
    Claim,
    Database,
    DatasetRepo,
    EventRepo,
    JobState,
    LeaseLost,
    Queue,
    StorageError,
    Unavailable,
)
from edgeprune.v1 import job_pb2

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 10.0  # the longest wait between two tries while the database is unavailable


class Backoff:
    """Doubling waits from ``first_s`` up to MAX_BACKOFF_S, jittered so that workers that
    lost the database together do not all come back in the same instant."""

    def __init__(self, first_s: float) -> None:
        self.first_s = max(first_s, 0.05)
        self.delay_s = self.first_s

    def next(self) -> float:
        delay = self.delay_s * random.uniform(0.5, 1.0)
        self.delay_s = min(self.delay_s * 2, MAX_BACKOFF_S)
        return delay

    def reset(self) -> None:
        self.delay_s = self.first_s


class Heartbeat(threading.Thread):
    """Extends a claim's lease; sets ``cancelled`` / ``lost`` when the queue says so."""

    def __init__(self, queue: Queue, claim: Claim, every_s: float) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{claim.job_id}")
        self.queue, self.claim, self.every_s = queue, claim, every_s
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every_s):
            try:
                if self.queue.heartbeat(self.claim):
                    self.cancelled.set()
            except LeaseLost:
                self.lost.set()
                return
            except StorageError as err:  # transient: the lease outlives a few misses
                log.warning("heartbeat of job %s failed: %s", self.claim.job_id, err)


class Worker:
    def __init__(self, config: Config, db: Database, *, worker_id: str | None = None) -> None:
        self.config = config
        self.queue = Queue(db, max_attempts=config.max_attempts, on_reclaim=_lease_expired)
        self.blobs = BlobStore(db)
        self.circuits = CircuitRepo(db)
        self.datasets = DatasetRepo(db)
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.device = resolve_device(config.device)
        self.memory_budget = worker_memory_budget(config, self.device)
        self.models = ModelCache(on_load=self._model_loaded)
        self.draining = threading.Event()
        self.parent_pid = int(os.environ.get("EDGEPRUNE_PARENT_PID", "0"))
        self.loop = probes.LoopBeat(self.worker_id)
        self.warm = not config.warm_models

    def drain(self, *_: Any) -> None:
        """Stop after the current step (signal handler)."""
        self.draining.set()

    def parent_gone(self) -> bool:
        return bool(self.parent_pid) and os.getppid() != self.parent_pid

    def run_forever(self) -> None:
        metrics.WORKERS.inc()
        log.info("worker %s on %s", self.worker_id, self.device)
        backoff = Backoff(self.config.poll_s)
        try:
            self.warm_up()
            while not self.draining.is_set():
                self.loop.beat()
                if self.parent_gone():
                    log.warning("the serving process is gone; stopping")
                    break
                try:
                    claim_ns = time.time_ns()
                    claim = self.queue.claim(self.worker_id, self.config.lease_s)
                    self.loop.ready(self.warm)  # the database answered
                    if claim is not None:
                        with logs.job_context(claim.job_id, claim.attempt), \
                                self._job_span(claim, claim_ns):
                            self.run_job(claim)
                except Exception as err:  # the worker outlives any database fault
                    self.loop.ready(False)
                    delay = backoff.next()
                    log.warning("the job queue failed (%s); trying again in %.1f s",
                                _describe(err), delay, exc_info=not isinstance(err, StorageError))
                    self.idle(delay)
                    continue
                backoff.reset()
                if claim is None:
                    self.idle(self.config.poll_s)
        finally:
            self.loop.ready(False)
            metrics.WORKERS.dec()

    def idle(self, seconds: float) -> None:
        """Wait (a drain ends it), beating at least once a second: a back-off wait is not a
        stall."""
        deadline = time.monotonic() + seconds
        while not self.draining.is_set() and (left := deadline - time.monotonic()) > 0:
            self.draining.wait(min(left, 1.0))
            self.loop.beat()

    def warm_up(self) -> None:
        """Load ``warm_models`` into the model cache (the worker is not ready before). A model
        that fails to load is logged and keeps the worker unready; jobs still run."""
        try:
            for name in self.config.warm_models:
                self.loop.beat()
                if self.draining.is_set():
                    return
                # the dtype of jobs that name none: the one their cache key asks for
                self.models.get(self._ref(name), self.device,
                                translate.dtype_name(0, self.device, self.config.worker_dtype))
                log.info("warmed up %s", name)
            self.warm = True
        except Exception as err:  # noqa: BLE001 - a bad model must not stop the worker
            log.error("warm-up failed: %s; the worker stays unready", err)
        self.loop.beat()

    # ------------------------------------------------------------------------------------ job

    def run_job(self, claim: Claim) -> None:
        job = claim.job
        log.info("job %s attempt %d started", job.id, claim.attempt)
        metrics.WORKERS_BUSY.inc()
        beat = Heartbeat(self.queue, claim, self.config.heartbeat_s)
        beat.start()
        reporter = _Reporter(self.queue, claim, self.config.progress_interval_s, self.device)
        try:
            def should_stop() -> bool:
                return (self.draining.is_set() or beat.cancelled.is_set() or beat.lost.is_set()
                        or self.parent_gone())

            spec = translate.parse_spec(job)
            # a data-parallel job polls should_stop while it waits for its ranks, stuck or not:
            # only their progress reports show that it moves
            parallel = isinstance(spec, job_pb2.JobSpec) and spec.data_parallel_workers > 1
            hooks = runner.Hooks(
                progress=self._beating(reporter.progress),
                checkpoint=lambda data: self.queue.checkpoint(claim, data),
                should_stop=should_stop if parallel else self._beating(should_stop),
                resume=load_checkpoint(
                    lambda: self.blobs.get(job.checkpoint_blob), reporter.warning,
                ) if job.checkpoint_blob else None,
                checkpoint_every=self.config.checkpoint_every,
                warning=reporter.warning,
            )
            outcome = self._execute(claim, hooks)
            reporter.flush()
            if beat.lost.is_set():
                log.warning("job %s: lease lost; dropping attempt %d", job.id, claim.attempt)
            elif beat.cancelled.is_set():
                self._finish(claim, JobState.CANCELLED, self.queue.acknowledge_cancel)
            elif outcome.stopped:
                if self.queue.release(claim).state == JobState.CANCELLED:  # a cancel came too
                    self._observe(claim, JobState.CANCELLED)
                log.info("job %s released (draining)", job.id)
            else:
                self._complete(claim, outcome)
        except LeaseLost as err:
            log.warning("job %s: %s", job.id, err)
        except Unavailable as err:  # the database, not the job: let another attempt run it
            log.warning("job %s: %s; releasing it", job.id, _describe(err))
            self._release_when_possible(claim)
        except Exception as exc:  # noqa: BLE001 - the job fails, the worker lives on
            self._fail(claim, exc)
        finally:
            beat.done.set()
            metrics.WORKERS_BUSY.dec()
            metrics.STEPS_PER_SECOND.set(0)

    @contextlib.contextmanager
    def _job_span(self, claim: Claim, claim_ns: int) -> Iterator[None]:
        """The span of a job attempt, in the trace of the call that submitted the job, from
        the claim that leased it."""
        if not tracing.enabled():
            yield
            return
        claimed_ns = time.time_ns()
        first = EventRepo(self.queue.db).after(claim.job_id, 0, limit=1)
        parent = first[0].payload.get("trace") if first else None
        with tracing.span("job.run", parent=parent if isinstance(parent, dict) else None,
                          start_ns=claim_ns, **{"job.id": claim.job_id, "job.kind": claim.job.kind,
                                                "job.attempt": claim.attempt,
                                                "worker.id": self.worker_id}):
            tracing.record_span("storage.queue.claim", claim_ns, claimed_ns)
            yield

    def _beating(self, hook: Callable[..., Any]) -> Callable[..., Any]:
        """``hook``, beating the job loop first (the job calls it before every step)."""

        def beating(*args: Any) -> Any:
            self.loop.beat()
            return hook(*args)

        return beating

    def _execute(self, claim: Claim, hooks: runner.Hooks) -> runner.Outcome:
        job = claim.job
        spec = translate.parse_spec(job)
        if not spec.dtype and self.config.worker_dtype:  # the dtype SubmitJob's estimate assumed
            spec.dtype = translate.DTYPES_BY_NAME[self.config.worker_dtype]
        if job.kind == translate.KIND_EVALUATION:
            assert isinstance(spec, job_pb2.EvaluationSpec)
            record = self.circuits.get(spec.circuit.removeprefix("circuits/"), full=True)
            return runner.run_evaluation(spec, record, self._ref(record.model), self.models,
                                         self.datasets, self.device, hooks,
                                         memory_budget=self.memory_budget)
        assert isinstance(spec, job_pb2.JobSpec)
        return runner.run_discovery(spec, self._ref(spec.model), self.models, self.datasets,
                                    self.device, hooks, memory_budget=self.memory_budget)

    def _ref(self, name: str) -> str:
        ref = self.config.models.get(name)
        if ref is None:
            raise FailedPrecondition(f"model {name!r} is not on this worker's allow-list",
                                     reason="MODEL_NOT_ALLOWED")
        return ref

    def _model_loaded(self, ref: str, seconds: float) -> None:
        names = [name for name, r in self.config.models.items() if r == ref]
        metrics.MODEL_LOAD_SECONDS.labels(names[0] if names else ref).observe(seconds)

    def _complete(self, claim: Claim, outcome: runner.Outcome) -> None:
        job = claim.job
        spec = translate.parse_spec(job)
        news = []
        for circuit, target in zip(outcome.circuits, outcome.targets, strict=True):
            assert outcome.model is not None and isinstance(spec, job_pb2.JobSpec)
            mask = self.blobs.put(runner.masks_blob(outcome.model, circuit),
                                  media_type="application/x-safetensors")
            news.append(translate.new_circuit(
                circuit, spec=spec, owner=job.owner,  # a circuit belongs to its job's owner
                job_id=job.id, task=outcome.task, target=target,
                total_node_count=outcome.model.graph.n_nodes,
                mask_blob=mask))
        # Storage adds the ids of the circuits it stores; an evaluation names the one it read.
        result: dict[str, Any] = {"metrics": outcome.metrics}
        if outcome.warnings:
            result["warnings"] = outcome.warnings
        if isinstance(spec, job_pb2.EvaluationSpec):
            result["circuits"] = [spec.circuit.removeprefix("circuits/")]
        with tracing.span("storage.queue.complete", circuits=len(news)):
            _, records = self.queue.complete(claim, news, result=result)
        self._observe(claim, JobState.SUCCEEDED)
        log.info("job %s succeeded (%d circuits)", job.id, len(records))

    def _fail(self, claim: Claim, exc: BaseException) -> None:
        error = classify(exc)
        message = error.message if error.code != "INTERNAL" else f"internal error: {exc!r}"
        log.warning("job %s failed: %s", claim.job_id, message, exc_info=error.code == "INTERNAL")
        try:
            self.queue.fail(claim, message, reason=error.code)
            self._observe(claim, JobState.FAILED)
        except LeaseLost as err:
            log.warning("job %s: %s", claim.job_id, err)
        except StorageError as err:  # its lease expires and the job runs again
            log.warning("job %s: cannot store its failure: %s", claim.job_id, _describe(err))

    def _release_when_possible(self, claim: Claim) -> None:
        """Release a job after a database fault, trying again (backing off) for as long as
        its lease lasts; past that the lease expires and the job is claimed again anyway."""
        backoff = Backoff(self.config.poll_s)
        deadline = time.monotonic() + self.config.lease_s
        while True:
            try:
                self.queue.release(claim)
                log.info("job %s released", claim.job_id)
                return
            except LeaseLost as err:
                log.warning("job %s: %s", claim.job_id, err)
                return
            except StorageError as err:
                delay = backoff.next()
                if time.monotonic() + delay > deadline:
                    log.warning("job %s: cannot release it (%s); its lease will expire",
                                claim.job_id, _describe(err))
                    return
                time.sleep(delay)

    def _finish(self, claim: Claim, state: JobState, action: Callable[[Claim], Any]) -> None:
        action(claim)
        self._observe(claim, state)
        log.info("job %s %s", claim.job_id, state.value.lower())

    def _observe(self, claim: Claim, state: JobState) -> None:
        started = claim.job.started_at
        metrics.JOBS_FINISHED.labels(claim.job.kind, state.value).inc()
        if started is not None:
            elapsed = time.time() - started.timestamp()
            metrics.JOB_SECONDS.labels(claim.job.kind, state.value).observe(max(elapsed, 0.0))


class _Reporter:
    """Turns engine progress into job events, at most one per interval (plus phase ends)."""

    def __init__(self, queue: Queue, claim: Claim, interval_s: float, device: str) -> None:
        self.queue, self.claim, self.interval_s, self.device = queue, claim, interval_s, device
        self.last_sent = 0.0
        self.pending: job_pb2.JobProgress | None = None
        self.phase = ""

    def progress(self, progress: job_pb2.JobProgress) -> None:
        if progress.steps_per_second > 0:
            metrics.STEP_SECONDS.observe(1.0 / progress.steps_per_second)
            metrics.STEPS_PER_SECOND.set(progress.steps_per_second)
        if progress.phase != self.phase:  # a phase begins: an event on the job's span
            self.phase = progress.phase
            tracing.event(f"phase {progress.phase}", total_steps=progress.total_steps)
        now = time.monotonic()
        phase_end = progress.step == progress.total_steps
        if now - self.last_sent < self.interval_s and not phase_end:
            self.pending = progress
            return
        self.send(progress, now)

    def send(self, progress: job_pb2.JobProgress, now: float) -> None:
        self.pending = None
        self.last_sent = now
        metrics.DEVICE_MEMORY.labels(self.device).set(metrics.device_memory(self.device))
        self.queue.report(self.claim, EVENT_PROGRESS, translate.progress_payload(progress))

    def flush(self) -> None:
        if self.pending is not None:
            self.send(self.pending, time.monotonic())

    def warning(self, fields: dict[str, Any]) -> None:
        """A warning about the result: its own event, at once (never throttled)."""
        self.flush()
        log.warning("job %s: %s", self.claim.job_id, fields.get("message", ""))
        self.queue.report(self.claim, EVENT_WARNING, fields)


def _lease_expired(job_id: str, state: JobState) -> None:
    log.warning("job %s: its lease expired; now %s", job_id, state.value)
    metrics.LEASE_EXPIRIES.labels(state.value).inc()


def _describe(err: BaseException) -> str:
    """An error for the log: an Unavailable with the driver's own words (they stay here)."""
    detail = getattr(err, "detail", "")
    return f"{err}: {detail}" if detail else str(err)


def run_worker(config: Config) -> int:
    """Run one worker in this process until SIGTERM/SIGINT (drain) or the parent exits."""
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    db = Database(config.effective_database_url)
    tracing.enable(config, "edgeprune-worker")
    worker = Worker(config, db)
    signal.signal(signal.SIGTERM, worker.drain)
    signal.signal(signal.SIGINT, worker.drain)
    try:
        worker.run_forever()
    finally:
        db.dispose()
        tracing.shutdown()
    return 0
