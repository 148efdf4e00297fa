"""Baselines in the same graph: EAP, EAP-IG and ACDC (DESIGN.md §1).

Every reader's input is linear in its edge masks, so the gradient of a metric with respect to the
dense edge mask at z = 1 is exactly each edge's EAP score (Syed et al. 2023); EAP-IG averages that
gradient along the straight mask path from z = 0 to z = 1 (midpoint rule, ``steps`` points).
Scores are absolute values; a scored method yields a circuit of any size by top-k (with dead
edges removed, see :mod:`edgeprune.engine.circuit`). ACDC (Conmy et al. 2023) walks the readers
from ``logits`` backwards, tries removing each incoming edge, and keeps the removal when the KL
to the full model grows by less than ``threshold``; it stops when its forward-pass budget runs out
and says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from edgeprune.engine import objective
from edgeprune.engine.cache import DEFAULT_BUDGET_BYTES, ActivationCache
from edgeprune.engine.circuit import (
    Circuit,
    build_circuit,
    live_edges,
    nodes_of_edges,
    out_edges,
    requested_edges,
)
from edgeprune.engine.errors import InvalidArgument
from edgeprune.engine.masked import CircuitModel
from edgeprune.engine.tasks import TaskDataset

log = logging.getLogger(__name__)

SCORED_METHODS = ("eap", "eap_ig")


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgument(f"batch_size must be an integer >= 1, got {batch_size!r}",
                              field="batch_size")


def mean_gradient(
    cache: ActivationCache, alphas: list[float], metric: str, *, batch_size: int = 32
) -> torch.Tensor:
    """d metric / d z_e averaged over the dataset and over uniform masks z = alpha: [E]."""
    graph, model = cache.model.graph, cache.model
    n = len(cache.dataset)
    total = torch.zeros(graph.n_edges, device=model.device)  # [E]
    for alpha in alphas:
        for index in torch.arange(n).split(batch_size):
            batch = cache.batch(index)
            z = torch.full((graph.n_edges,), alpha, device=model.device, requires_grad=True)  # [E]
            value = objective.metric(metric, batch, cache.logits(batch, z, None))
            (grad,) = torch.autograd.grad(value * (len(index) / n), z)
            total += grad.float()
    return (total / len(alphas)).cpu()  # [E]


def eap_scores(cache: ActivationCache, *, metric: str | None = None, batch_size: int = 32) -> torch.Tensor:
    """EAP: |d metric / d z_e| at z = 1: [E]."""
    name = objective.check_metric(metric, cache.dataset)
    return mean_gradient(cache, [1.0], name, batch_size=batch_size).abs()


def eap_ig_scores(
    cache: ActivationCache, *, steps: int = 5, metric: str | None = None, batch_size: int = 32
) -> torch.Tensor:
    """EAP-IG: |mean of d metric / d z_e along z = alpha, alpha in (0, 1)|, midpoint rule: [E]."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidArgument(f"steps must be an integer >= 1, got {steps!r}", field="ig_steps")
    name = objective.check_metric(metric, cache.dataset)
    alphas = [(k + 0.5) / steps for k in range(steps)]
    return mean_gradient(cache, alphas, name, batch_size=batch_size).abs()


def attribute(
    model: CircuitModel,
    dataset: TaskDataset,
    method: str = "eap",
    *,
    metric: str | None = None,
    ablation: str = "corrupted",
    ig_steps: int = 5,
    batch_size: int = 32,
    cache_bytes: int = DEFAULT_BUDGET_BYTES,
) -> torch.Tensor:
    """Edge scores [E] (higher = more important) of a scored method: "eap" or "eap_ig"."""
    if method not in SCORED_METHODS:
        raise InvalidArgument(
            f"method must be one of {', '.join(SCORED_METHODS)}, not {method!r}", field="method"
        )
    _check_batch_size(batch_size)
    cache = ActivationCache(model, dataset, ablation=ablation, budget_bytes=cache_bytes)
    if method == "eap":
        return eap_scores(cache, metric=metric, batch_size=batch_size)
    return eap_ig_scores(cache, steps=ig_steps, metric=metric, batch_size=batch_size)


def scored_circuit(
    model: CircuitModel,
    dataset: TaskDataset,
    scores: torch.Tensor,
    *,
    method: str,
    n_edges: int | None = None,
    sparsity: float | None = None,
    settings: dict[str, Any] | None = None,
) -> Circuit:
    """The top-scored circuit of ``n_edges`` (or ``sparsity``) live edges."""
    k = requested_edges(model.graph, n_edges=n_edges, sparsity=sparsity)
    if k is None:
        raise InvalidArgument("give n_edges or sparsity", field="n_edges")
    target = {"n_edges": n_edges} if n_edges is not None else {"sparsity": sparsity}
    return build_circuit(
        model.graph, scores, n_edges=k, model=model.name, method=method, target=target,
        settings=settings, provenance=provenance(dataset),
    )


def provenance(dataset: TaskDataset) -> dict[str, Any]:
    return {"dataset": dataset.name, "split": dataset.split, "dataset_hash": dataset.content_hash,
            "examples": len(dataset)}


def warm_start_log_alpha(scores: torch.Tensor, n_keep: int, *, scale: float = 3.0) -> torch.Tensor:
    """Initial log_alphas [E] from scores [E]: ``log(score / cut)``, clamped to [-scale, scale].

    ``cut`` lies between the ``n_keep``-th and the next score, so the top ``n_keep`` edges start on
    (log_alpha > 0) and the rest off. On the log scale an edge's start reflects how far its score is
    from the cut, so the short random walk of early Adam steps only reorders edges of similar
    scores (a rank-linear start would pack tens of thousands of edges into a few units).
    """
    E = scores.numel()
    n_keep = min(max(n_keep, 1), E)
    values = scores.detach().float().cpu().clamp(min=0)  # [E]
    ordered = torch.sort(values, descending=True).values  # [E]
    above = ordered[n_keep - 1]
    below = ordered[n_keep] if n_keep < E else above / 2
    tiny = torch.finfo(torch.float32).tiny
    cut = torch.sqrt(above.clamp(min=tiny) * below.clamp(min=tiny))
    return torch.log(values.clamp(min=tiny) / cut).clamp(-scale, scale)


# ---- ACDC ----------------------------------------------------------------------------------------


@dataclass
class AcdcResult:
    """ACDC's circuit and how far it got."""

    circuit: Circuit
    forwards: int  # masked forward passes spent
    tested: int  # edges tried
    budget_exhausted: bool  # True: untested edges were kept as they were
    kl: float  # KL of the final circuit (before dead edges were dropped)


def acdc(
    model: CircuitModel,
    dataset: TaskDataset,
    *,
    threshold: float = 0.01,
    max_forwards: int = 10_000,
    ablation: str = "corrupted",
    batch_size: int = 32,
    cache_bytes: int = DEFAULT_BUDGET_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> AcdcResult:
    """Greedy ACDC from ``logits`` backwards, bounded by ``max_forwards`` masked forward passes.

    Readers are visited in reverse graph order, their edges from the latest writer back; a reader
    whose nodes have no kept outgoing edge loses its inputs without a test. ``progress(forwards,
    tested)`` is called after each test.
    """
    if not isinstance(threshold, (int, float)) or threshold < 0:
        raise InvalidArgument(f"threshold must be >= 0, got {threshold!r}", field="threshold")
    if isinstance(max_forwards, bool) or not isinstance(max_forwards, int) or max_forwards < 1:
        raise InvalidArgument(f"max_forwards must be an integer >= 1, got {max_forwards!r}",
                              field="max_forwards")
    _check_batch_size(batch_size)
    graph = model.graph
    cache = ActivationCache(model, dataset, ablation=ablation, budget_bytes=cache_bytes)
    batches = [cache.batch(index) for index in torch.arange(len(dataset)).split(batch_size)]
    n = len(dataset)

    @torch.no_grad()
    def kl(keep: np.ndarray) -> float:
        mask = torch.from_numpy(keep.astype(np.float32)).to(model.device)  # [E]
        total = 0.0
        for b in batches:
            logits = cache.logits(b, mask, None)  # [B, P, V]
            total += float(objective.loss("kl", b, logits)) * len(b.data) / n
        return total

    keep = np.ones(graph.n_edges, dtype=bool)  # [E]
    deltas: dict[int, float] = {}
    forwards, tested, exhausted = len(batches), 0, False
    current = kl(keep)
    for r in range(graph.n_readers - 1, -1, -1):
        block = range(graph.reader_offsets[r], graph.reader_offsets[r + 1])
        reader = graph.readers[r]
        if reader != "logits" and not any(
            keep[out_edges(graph, graph.writer_index(node))].any() for node in graph.reader_heads(reader)
        ):
            keep[block.start : block.stop] = False  # nothing downstream reads these nodes
            continue
        for e in reversed(block):
            if forwards + len(batches) > max_forwards:
                exhausted = True
                break
            keep[e] = False
            value = kl(keep)
            forwards += len(batches)
            tested += 1
            if value - current < threshold:
                current = value
            else:
                keep[e] = True
                deltas[e] = value - current
            if progress is not None:
                progress(forwards, tested)
        if exhausted:
            log.info("ACDC ran out of its budget of %d forward passes after %d edges", max_forwards, tested)
            break

    live = live_edges(graph, torch.from_numpy(keep)).numpy()  # [E]
    index = np.flatnonzero(live).tolist()
    edges = [graph.edges[i] for i in index]
    circuit = Circuit(
        model=model.name,
        method="acdc",
        edges=edges,
        edge_scores={graph.edges[i]: deltas.get(i, 0.0) for i in index},
        nodes=nodes_of_edges(edges, graph),
        n_edges_total=graph.n_edges,
        target={"threshold": threshold},
        settings={"threshold": threshold, "max_forwards": max_forwards, "ablation": ablation,
                  "batch_size": batch_size},
        provenance=provenance(dataset),
        metrics={"forwards": forwards, "tested": tested, "budget_exhausted": exhausted},
    )
    return AcdcResult(circuit=circuit, forwards=forwards, tested=tested, budget_exhausted=exhausted,
                      kl=current)
