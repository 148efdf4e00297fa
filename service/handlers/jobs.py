"""Jobs: submit (validated, defaults filled, idempotent), get, list, cancel, delete."""

from __future__ import annotations

from google.protobuf import json_format

from edgeprune.service import tracing
from edgeprune.service.config import Config
from edgeprune.service.converters import KIND_DISCOVERY, KIND_EVALUATION, STATES_BY_PROTO
from edgeprune.service.dataset_check import DatasetChecks
from edgeprune.service.errors import (
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from edgeprune.service.memory_check import check_job_memory, min_tokens
from edgeprune.service.principals import Principal
from edgeprune.service.validation import (
    Violations,
    check_common,
    check_labels,
    check_page,
    normalize_evaluation,
    normalize_job_spec,
    parse_name,
)
from edgeprune.storage import (
    CircuitRepo,
    DatasetRecord,
    DatasetRepo,
    JobRecord,
    JobRepo,
    NewJob,
    Page,
    Queue,
    QueueFull,
)
from edgeprune.storage import Conflict as StorageConflict
from edgeprune.storage import NotFound as StorageNotFound
from edgeprune.v1 import circuit_pb2, common_pb2, job_pb2

MAX_CACHED_SHAPES = 1024  # datasets' token bounds kept for the memory check


class JobHandler:
    def __init__(self, jobs: JobRepo, queue: Queue, datasets: DatasetRepo, circuits: CircuitRepo,
                 config: Config) -> None:
        self.jobs = jobs
        self.queue = queue
        self.datasets = datasets
        self.circuits = circuits
        self.config = config
        self._dataset_bounds: dict[str, int] = {}  # datasets never change
        self.dataset_checks = DatasetChecks(datasets)

    # ---------------------------------------------------------------------------- submit

    def submit(self, request: job_pb2.SubmitJobRequest, who: Principal) -> JobRecord:
        """Queue a discovery job (the same request_id returns the same job)."""
        v = Violations()
        spec = job_pb2.JobSpec()
        spec.CopyFrom(request.spec)
        if not request.HasField("spec"):
            v.bad("spec", "is required")
        else:
            normalize_job_spec(spec, self.config, v)
        check_common(v, priority=request.priority, labels=request.labels,
                     request_id=request.request_id, config=self.config)
        v.raise_if_any()
        self._check_priority(request.priority, who)
        dataset = self._check_references(spec.data, "spec.data", who)
        ref = self.config.models[spec.model]
        longest = self._check_dataset(spec.data, "spec.data", ref,
                                      all_positions=spec.positions == common_pb2.POSITION_MODE_ALL)
        check_job_memory(spec, ref, self.config, lambda d: self._dataset_shape(dataset, longest))
        return self._create(spec, KIND_DISCOVERY, request.priority, request.labels,
                            request.request_id, who)

    def evaluate(self, request: circuit_pb2.EvaluateCircuitRequest, who: Principal) -> JobRecord:
        """Queue an evaluation of a stored circuit."""
        v = Violations()
        spec = job_pb2.EvaluationSpec()
        spec.CopyFrom(request.evaluation)
        circuit_id = ""
        if not request.HasField("evaluation"):
            v.bad("evaluation", "is required")
        else:
            circuit_id = normalize_evaluation(spec, self.config, v)
        check_common(v, priority=request.priority, labels=request.labels,
                     request_id=request.request_id, config=self.config)
        v.raise_if_any()
        self._check_priority(request.priority, who)
        circuit = self.circuits.get(circuit_id, full=False)
        if not who.may_see(circuit.owner):
            raise StorageNotFound("circuit", circuit_id)
        if circuit.model not in self.config.models:
            raise FailedPrecondition(f"the circuit's model {circuit.model!r} is no longer on the "
                                     "allow-list", reason="MODEL_NOT_ALLOWED")
        dataset = self._check_references(spec.data, "evaluation.data", who)
        ref = self.config.models[circuit.model]
        longest = self._check_dataset(spec.data, "evaluation.data", ref, all_positions=False)
        check_job_memory(spec, ref, self.config, lambda d: self._dataset_shape(dataset, longest))
        return self._create(spec, KIND_EVALUATION, request.priority, request.labels,
                            request.request_id, who)

    def _check_priority(self, priority: int, who: Principal) -> None:
        if who.admin:
            return
        limit = who.max_priority if who.max_priority is not None else self.config.user_max_priority
        if priority > limit:
            raise PermissionDenied(f"priority: {who.name} may submit at priority {limit} at most, "
                                   f"got {priority}", reason="PRIORITY_NOT_ALLOWED",
                                   violations=[("priority", f"at most {limit}")])

    def _check_references(self, data: job_pb2.DataSpec, field: str,
                          who: Principal) -> DatasetRecord | None:
        """The uploaded dataset the data names, which ``who`` must be allowed to see."""
        if data.WhichOneof("source") != "dataset":
            return None
        dataset_id = parse_name(data.dataset, "datasets", field=f"{field}.dataset")
        try:
            dataset = self.datasets.get(dataset_id)
        except StorageNotFound:
            dataset = None
        if dataset is None or not who.may_see(dataset.owner):
            raise NotFound(f"{field}.dataset: {data.dataset} does not exist",
                           reason="DATASET_NOT_FOUND")
        return dataset

    def _check_dataset(self, data: job_pb2.DataSpec, field: str, ref: str, *,
                       all_positions: bool) -> int | None:
        """An uploaded dataset against the model's tokenizer, as the worker will build it: its
        longest example's token count, or None when the API cannot tokenize for the model (or
        the data is not an uploaded dataset)."""
        if data.WhichOneof("source") != "dataset":
            return None
        return self.dataset_checks.check(data.dataset.removeprefix("datasets/"), ref,
                                         f"{field}.dataset", all_positions=all_positions)

    def _dataset_shape(self, dataset: DatasetRecord, longest: int | None) -> tuple[int, int]:
        """(tokens of its longest example, example count) of the job's uploaded dataset: exact
        from the dataset check where the API can tokenize for the model, else a bound no
        tokenizer goes below (the same for every model, so kept per dataset)."""
        if longest is None:
            if dataset.id not in self._dataset_bounds:
                texts = (row["clean"] for batch in self.datasets.iter_examples(dataset.id)
                         for row in batch)
                if len(self._dataset_bounds) >= MAX_CACHED_SHAPES:
                    self._dataset_bounds.pop(next(iter(self._dataset_bounds)))
                self._dataset_bounds[dataset.id] = min_tokens(texts)
            longest = self._dataset_bounds[dataset.id]
        return longest, dataset.example_count

    def _create(self, spec: job_pb2.JobSpec | job_pb2.EvaluationSpec, kind: str, priority: int,
                labels: dict[str, str], request_id: str, who: Principal) -> JobRecord:
        new = NewJob(
            spec=spec.SerializeToString(deterministic=True),
            spec_json=json_format.MessageToDict(spec, preserving_proto_field_name=True),
            kind=kind,
            priority=priority,
            labels=dict(labels),
            owner=who.name,
            request_id=request_id or None,
        )
        # Counted in the create transaction: concurrent submits cannot overshoot a cap. Admins
        # (and everyone on a server without tokens) share only the queue's cap.
        limits = self.config.limits
        try:
            with tracing.span("storage.job.create", **{"job.kind": kind}):
                return self.jobs.create(new, max_pending=limits.max_pending_jobs,
                                        max_pending_per_owner=None if who.admin
                                        else limits.max_pending_jobs_per_principal,
                                        trace=tracing.carrier())
        except QueueFull as err:
            reason = "QUEUE_FULL" if err.owner is None else "PRINCIPAL_QUEUE_FULL"
            raise ResourceExhausted(str(err), reason=reason) from err

    # ------------------------------------------------------------------------------ read

    def get(self, job_id: str, who: Principal, *, full: bool = False) -> JobRecord:
        """Another principal's job is NOT_FOUND exactly as a missing one is. Without `full`
        the record has no spec bytes; a full record too large for a reply has none either."""
        job = self.jobs.get(job_id, full=full, max_bytes=self.config.limits.reply_bytes)
        if not who.may_see(job.owner):
            raise StorageNotFound("job", job_id)
        return job

    def list(self, request: job_pb2.ListJobsRequest, who: Principal) -> Page[JobRecord]:
        """Newest first. A FULL page ends early (with a token) where the next job would take
        the reply past the message size limit (AIP-158 allows short pages); a job too large
        for any reply comes as in BASIC (the converter counts its inline examples)."""
        v = Violations()
        size = check_page(v, request.page_size, self.config)
        states = []
        for i, state in enumerate(request.states):
            if state not in STATES_BY_PROTO:
                v.bad(f"states[{i}]", f"unknown job state {state}")
            else:
                states.append(STATES_BY_PROTO[state])
        check_labels(v, "labels", request.labels, self.config)
        v.raise_if_any()
        full = request.view == common_pb2.VIEW_FULL
        return self.jobs.list(states=states or None, owner=who.owner_filter,
                              model=request.model or None, labels=dict(request.labels) or None,
                              page_size=size, page_token=request.page_token or None, full=full,
                              max_bytes=self.config.limits.reply_bytes if full else None)

    def cancel(self, job_id: str, who: Principal) -> JobRecord:
        self.get(job_id, who)
        return self.jobs.request_cancel(job_id)

    def delete(self, job_id: str, who: Principal) -> None:
        """Delete a finished job (its circuits stay); FAILED_PRECONDITION while it may run."""
        self.get(job_id, who)
        try:
            self.jobs.delete(job_id)
        except StorageConflict as err:
            raise FailedPrecondition(str(err), reason="JOB_NOT_FINISHED") from err
