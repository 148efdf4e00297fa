"""Circuits at many sizes from one call, and the MIB areas CPR and CMD.

A scored method (EAP, EAP-IG) is run once and cut at every size; Edge Pruning trains one run per
size (``prune_each_size``, the faithful way) or cuts every size from one run's masks. Every
circuit is evaluated on the evaluation set in one pass (full model and empty circuit once).

CPR is the area under faithfulness and CMD the area under |1 - faithfulness|, both against the
fraction of edges kept (the circuit's own, after dead edges are dropped), by the trapezoid rule
over the measured sizes, as in the MIB benchmark (Mueller et al. 2025): higher CPR and lower CMD
are better; faithfulness 1 at every size gives CPR = the span of fractions covered and CMD = 0.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeprune.engine import attribution
from edgeprune.engine.cache import DEFAULT_BUDGET_BYTES, ActivationCache
from edgeprune.engine.circuit import Circuit
from edgeprune.engine.errors import InvalidArgument
from edgeprune.engine.masked import CircuitModel
from edgeprune.engine.metrics import evaluate_many
from edgeprune.engine.prune import PruneConfig, prune
from edgeprune.engine.tasks import TaskDataset

MIB_SIZES = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
METHODS = ("edge_pruning", *attribution.SCORED_METHODS)


def area(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Trapezoid-rule area under the points (xs, ys), sorted by x; NaN points are skipped."""
    points = sorted((x, y) for x, y in zip(xs, ys, strict=True) if not math.isnan(y))
    return sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in itertools.pairwise(points))


def cpr(fractions: Sequence[float], faithfulness: Sequence[float]) -> float:
    """Area under faithfulness against the fraction of edges kept (higher is better)."""
    return area(fractions, faithfulness)


def cmd(fractions: Sequence[float], faithfulness: Sequence[float]) -> float:
    """Area under |1 - faithfulness| against the fraction of edges kept (lower is better)."""
    return area(fractions, [abs(1.0 - f) for f in faithfulness])


@dataclass
class SweepResult:
    """One circuit per size with its metrics, and the areas over all sizes."""

    method: str
    sizes: list[float]
    circuits: list[Circuit]
    cpr: float
    cmd: float
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per size: method, requested size, and the circuit's metrics."""
        return [{"method": self.method, "size": s, **c.metrics} for s, c in zip(self.sizes, self.circuits)]


def check_sizes(sizes: Sequence[float]) -> list[float]:
    """Requested fractions of edges, each in (0, 1]."""
    if not sizes:
        raise InvalidArgument("sizes is empty", field="sizes")
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 < s <= 1.0:
            raise InvalidArgument(f"every size must be a fraction of edges in (0, 1], got {s!r}",
                                  field="sizes")
    return [float(s) for s in sizes]


def sweep(
    model: CircuitModel,
    train: TaskDataset,
    evaluation: TaskDataset,
    *,
    method: str = "eap",
    sizes: Sequence[float] = MIB_SIZES,
    ablation: str = "corrupted",
    prune_config: PruneConfig | None = None,
    prune_each_size: bool = True,
    ig_steps: int = 5,
    metric: str | None = None,
    batch_size: int = 32,
    cache_bytes: int = DEFAULT_BUDGET_BYTES,
    on_circuit: Callable[[float, Circuit], None] | None = None,
) -> SweepResult:
    """Circuits of ``method`` at every size (fractions of edges), evaluated on ``evaluation``.

    ``prune_config`` sets Edge Pruning's options (its size and ablation are set per call);
    ``on_circuit(size, circuit)`` is called as each circuit is made (before evaluation).
    """
    if method not in METHODS:
        raise InvalidArgument(f"method must be one of {', '.join(METHODS)}, not {method!r}",
                              field="method")
    fractions = check_sizes(sizes)
    graph = model.graph
    start = time.perf_counter()
    circuits: list[Circuit] = []
    if method == "edge_pruning":
        base = dataclasses.replace(prune_config or PruneConfig(), ablation=ablation,
                                   edge_count=None, edge_sparsity=None)
        shared, warm = None, None
        if prune_each_size and base.warm_start == "eap_ig":  # one warm start's scores for all
            warm = attribution.eap_ig_scores(
                ActivationCache(model, train, ablation=ablation, budget_bytes=base.cache_bytes),
                steps=base.warm_start_ig_steps, batch_size=base.batch_size)
        for size in fractions:
            if prune_each_size:
                circuit = prune(model, train, dataclasses.replace(base, edge_sparsity=1.0 - size),
                                warm_scores=warm).circuit
            else:  # one run, trained at the sparsest size
                if shared is None:
                    shared = prune(model, train,
                                   dataclasses.replace(base, edge_sparsity=1.0 - min(fractions)))
                circuit = shared.circuit_at(model, edge_sparsity=1.0 - size)
            circuits.append(circuit)
            if on_circuit is not None:
                on_circuit(size, circuit)
        settings = {"prune_each_size": prune_each_size, **dataclasses.asdict(base)}
    else:
        scores = attribution.attribute(model, train, method, metric=metric, ablation=ablation,
                                       ig_steps=ig_steps, batch_size=batch_size,
                                       cache_bytes=cache_bytes)
        settings = {"ig_steps": ig_steps, "metric": metric, "ablation": ablation}
        for size in fractions:
            circuit = attribution.scored_circuit(model, train, scores, method=method,
                                                 edge_count=round(size * graph.n_edges),
                                                 settings=settings)
            circuits.append(circuit)
            if on_circuit is not None:
                on_circuit(size, circuit)
    seconds = time.perf_counter() - start
    results = evaluate_many(model, circuits, evaluation, ablation=ablation, batch_size=batch_size)
    for circuit, metrics in zip(circuits, results, strict=True):
        circuit.metrics.update(metrics)
    kept = [c.edge_count / graph.n_edges for c in circuits]
    faithful = [c.metrics.get("faithfulness", math.nan) for c in circuits]
    return SweepResult(method=method, sizes=fractions, circuits=circuits, cpr=cpr(kept, faithful),
                       cmd=cmd(kept, faithful), seconds=seconds, settings=settings)
