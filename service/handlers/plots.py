"""Plots of a job: the training curves of an Edge Pruning run (from its stored progress events)
and the faithfulness of its circuits against their size (from the stored circuits)."""

from __future__ import annotations

import math
from typing import Any

from edgeprune.service.config import Config
from edgeprune.service.converters import EVENT_PROGRESS, KIND_DISCOVERY
from edgeprune.service.errors import FailedPrecondition, InvalidArgument
from edgeprune.service.principals import Principal
from edgeprune.storage import CircuitFilter, CircuitRepo, EventRepo, JobRecord, JobRepo, NotFound
from edgeprune.storage.events import MAX_EVENTS_PER_READ
from edgeprune.v1 import common_pb2, job_pb2

# a job's events read for its training curves: a few per step, so this covers ~50k steps
MAX_PLOT_EVENTS = 200_000
MAX_PLOT_CIRCUITS = 1000  # circuits of one job on a faithfulness plot
IMAGES = {
    job_pb2.IMAGE_FORMAT_UNSPECIFIED: ("svg", "image/svg+xml"),
    job_pb2.IMAGE_FORMAT_SVG: ("svg", "image/svg+xml"),
    job_pb2.IMAGE_FORMAT_PNG: ("png", "image/png"),
}
PLOTS = {job_pb2.JOB_PLOT_TRAINING: "training", job_pb2.JOB_PLOT_FAITHFULNESS: "faithfulness"}


class PlotHandler:
    def __init__(self, jobs: JobRepo, events: EventRepo, circuits: CircuitRepo,
                 config: Config) -> None:
        self.jobs = jobs
        self.events = events
        self.circuits = circuits
        self.config = config

    def job_plot(self, job_id: str, plot: int, fmt: int, who: Principal) -> tuple[str, str, bytes]:
        """(content type, file name, bytes) of a plot of a job the caller may see."""
        if fmt not in IMAGES:
            raise InvalidArgument(f"unknown value {fmt}", field="format")
        if plot != job_pb2.JOB_PLOT_UNSPECIFIED and plot not in PLOTS:
            raise InvalidArgument(f"unknown value {plot}", field="plot")
        job = self.jobs.get(job_id, full=False)
        if not who.may_see(job.owner):
            raise NotFound("job", job_id)
        if plot == job_pb2.JOB_PLOT_UNSPECIFIED:
            plot = job_pb2.JOB_PLOT_TRAINING if _trains(job) else job_pb2.JOB_PLOT_FAITHFULNESS
        kind, content_type = IMAGES[fmt]
        title = f"job {job.id}"
        if plot == job_pb2.JOB_PLOT_TRAINING:
            data = self._training(job, kind, title)
        else:
            data = self._faithfulness(job, kind, title)
        return content_type, f"job-{job.id}-{PLOTS[plot]}.{kind}", data

    def _training(self, job: JobRecord, kind: str, title: str) -> bytes:
        from edgeprune.engine.drawing.plots import training_plot  # matplotlib: on first use

        steps: list[dict[str, Any]] = []
        seq, read = 0, 0
        while read < MAX_PLOT_EVENTS:
            batch = self.events.after(job.id, seq, limit=MAX_EVENTS_PER_READ)
            if not batch:
                break
            read += len(batch)
            seq = batch[-1].sequence
            steps += [e.payload for e in batch
                      if e.kind == EVENT_PROGRESS and e.payload.get("phase") == "prune"]
        if not steps:
            raise FailedPrecondition("this job has recorded no training steps (only Edge "
                                     "Pruning jobs train masks)", reason="NO_TRAINING")
        return training_plot(steps, kind, title=f"{title}: training")

    def _faithfulness(self, job: JobRecord, kind: str, title: str) -> bytes:
        from edgeprune.engine.drawing.plots import faithfulness_plot

        page = self.circuits.list(CircuitFilter(job_id=job.id), page_size=MAX_PLOT_CIRCUITS)
        points = [(c.edge_count / c.total_edge_count, float(c.metrics["faithfulness"]))
                  for c in page.items
                  if c.total_edge_count and isinstance(c.metrics.get("faithfulness"), int | float)
                  and math.isfinite(c.metrics["faithfulness"])]
        if not points:
            raise FailedPrecondition("this job has no evaluated circuit with a faithfulness yet",
                                     reason="NO_CIRCUITS")
        xs, ys = zip(*points, strict=True)
        method = page.items[0].method
        return faithfulness_plot(xs, ys, kind, title=f"{title} · {method}: faithfulness")


def _trains(job: JobRecord) -> bool:
    """Whether the job trains masks (an Edge Pruning discovery job)."""
    if job.kind != KIND_DISCOVERY:
        return False
    method = job.spec_json.get("method")
    return method in (common_pb2.METHOD_EDGE_PRUNING, "METHOD_EDGE_PRUNING")
