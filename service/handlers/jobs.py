"""Jobs: submit (validated, defaults filled, idempotent), get, list, cancel."""

from __future__ import annotations

from collections.abc import Callable

from google.protobuf import json_format

from edgeprune.service.config import Config
from edgeprune.service.converters import KIND_DISCOVERY, KIND_EVALUATION, STATES_BY_PROTO
from edgeprune.service.errors import FailedPrecondition, NotFound, ResourceExhausted
from edgeprune.service.memory_check import check_job_memory, min_tokens
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
    DatasetRepo,
    JobRecord,
    JobRepo,
    NewJob,
    Page,
    Queue,
)
from edgeprune.storage import NotFound as StorageNotFound
from edgeprune.v1 import circuit_pb2, job_pb2

# ListJobs filters that storage cannot apply are applied here over at most this many pages.
MAX_FILTER_SCAN_PAGES = 20


class JobHandler:
    def __init__(self, jobs: JobRepo, queue: Queue, datasets: DatasetRepo, circuits: CircuitRepo,
                 config: Config) -> None:
        self.jobs = jobs
        self.queue = queue
        self.datasets = datasets
        self.circuits = circuits
        self.config = config
        self._dataset_shapes: dict[str, tuple[int, int]] = {}  # datasets never change

    # ---------------------------------------------------------------------------- submit

    def submit(self, request: job_pb2.SubmitJobRequest, *, caller: str = "") -> JobRecord:
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
        self._check_references(spec.data, "spec.data")
        check_job_memory(spec, self.config.models[spec.model], self.config, self._dataset_shape)
        return self._create(spec, KIND_DISCOVERY, request.priority, request.labels,
                            request.request_id, caller)

    def evaluate(self, request: circuit_pb2.EvaluateCircuitRequest, *, caller: str = "") -> JobRecord:
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
        circuit = self.circuits.get(circuit_id, full=False)
        if circuit.model not in self.config.models:
            raise FailedPrecondition(f"the circuit's model {circuit.model!r} is no longer on the "
                                     "allow-list", reason="MODEL_NOT_ALLOWED")
        self._check_references(spec.data, "evaluation.data")
        check_job_memory(spec, self.config.models[circuit.model], self.config,
                         self._dataset_shape)
        return self._create(spec, KIND_EVALUATION, request.priority, request.labels,
                            request.request_id, caller)

    def _check_references(self, data: job_pb2.DataSpec, field: str) -> None:
        if data.WhichOneof("source") == "dataset":
            dataset_id = parse_name(data.dataset, "datasets", field=f"{field}.dataset")
            try:
                self.datasets.get(dataset_id)
            except StorageNotFound as err:
                raise NotFound(f"{field}.dataset: {data.dataset} does not exist",
                               reason="DATASET_NOT_FOUND") from err

    def _dataset_shape(self, dataset_id: str) -> tuple[int, int]:
        """(fewest tokens of its longest example, example count) of a stored dataset."""
        if dataset_id not in self._dataset_shapes:
            texts = (row["clean"] for batch in self.datasets.iter_examples(dataset_id)
                     for row in batch)
            count = self.datasets.get(dataset_id).example_count
            self._dataset_shapes[dataset_id] = (min_tokens(texts), count)
        return self._dataset_shapes[dataset_id]

    def _create(self, spec: job_pb2.JobSpec | job_pb2.EvaluationSpec, kind: str, priority: int,
                labels: dict[str, str], request_id: str, caller: str) -> JobRecord:
        if self.queue.pending_count() >= self.config.limits.max_pending_jobs:
            raise ResourceExhausted(
                f"the queue holds {self.config.limits.max_pending_jobs} pending jobs; retry later",
                reason="QUEUE_FULL")
        return self.jobs.create(NewJob(
            spec=spec.SerializeToString(deterministic=True),
            spec_json=json_format.MessageToDict(spec, preserving_proto_field_name=True),
            kind=kind,
            priority=priority,
            labels=dict(labels),
            caller=caller,
            request_id=request_id or None,
        ))

    # ------------------------------------------------------------------------------ read

    def get(self, job_id: str) -> JobRecord:
        return self.jobs.get(job_id)

    def list(self, request: job_pb2.ListJobsRequest) -> Page[JobRecord]:
        """Newest first. `model` and `labels` are matched here, page by page, so a page may
        hold fewer jobs than asked for while `next_page_token` is set (AIP-158)."""
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
        keep = _matcher(request)
        items: list[JobRecord] = []
        token = request.page_token or None
        for _ in range(MAX_FILTER_SCAN_PAGES):
            page = self.jobs.list(states=states or None, page_size=size - len(items),
                                  page_token=token)
            items.extend(job for job in page.items if keep(job))
            token = page.next_page_token
            if token is None or len(items) >= size:
                break
        return Page(items=items, next_page_token=token)

    def cancel(self, job_id: str) -> JobRecord:
        return self.jobs.request_cancel(job_id)

    def is_final(self, job_id: str) -> bool:
        return self.jobs.get(job_id).state.final


def _matcher(request: job_pb2.ListJobsRequest) -> Callable[[JobRecord], bool]:
    def keep(job: JobRecord) -> bool:
        if request.model and job.spec_json.get("model") != request.model:
            return False
        return all(job.labels.get(k) == v for k, v in request.labels.items())

    return keep

