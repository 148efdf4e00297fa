"""Baselines in the same graph: EAP, EAP-IG and ACDC.

Every reader's input is linear in its edge masks, so the gradient of a metric with respect to the
dense edge mask at z = 1 is exactly each edge's EAP score (Syed et al. 2023): the reader's gradient
dotted with its writer's output minus that writer's ablation value.

Two integrated-gradient variants:

* ``eap_ig`` (:func:`eap_ig_scores`) is EAP-IG as Hanna et al. (2024) define it and the MIB
  benchmark reports it ("EAP-IG-inputs"): the gradients are averaged over runs whose *input
  embeddings* move from the corrupted prompt's towards the clean one's, and each edge's score is
  that mean reader gradient dotted with the writer's clean-minus-corrupted output.
* ``eap_ig_edges`` (:func:`eap_ig_edge_scores`) averages the mask gradient along the straight path
  of *every edge mask together* from z = 0 to z = 1 (auto-circuit's "integrated edge gradients").

Scores are absolute values; a scored method yields a circuit of any size by top-k (with dead
edges removed, see :mod:`edgeprune.engine.circuit`). ACDC (Conmy et al. 2023) walks the readers
from ``logits`` backwards, tries removing each incoming edge, and keeps the removal when the KL
to the full model grows by less than ``threshold``; it stops when its forward-pass budget runs out
and says so.

Long scorers take ``progress(done, total)``, called after every forward and backward pass, and
``should_stop()``, polled before every one; when it returns True they raise
:class:`~edgeprune.engine.errors.Stopped` (partial scores would rank edges on part of the data).
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
    size_target,
)
from edgeprune.engine.errors import InvalidArgument, Stopped
from edgeprune.engine.masked import CircuitModel
from edgeprune.engine.tasks import TaskDataset

log = logging.getLogger(__name__)

SCORED_METHODS = ("eap", "eap_ig", "eap_ig_edges")

Progress = Callable[[int, int], None]
ShouldStop = Callable[[], bool]


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgument(f"batch_size must be an integer >= 1, got {batch_size!r}",
                              field="batch_size")


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidArgument(f"steps must be an integer >= 1, got {steps!r}", field="ig_steps")


class _Passes:
    """Counts forward and backward passes for ``progress`` and polls ``should_stop`` before each."""

    def __init__(self, total: int, progress: Progress | None, should_stop: ShouldStop | None) -> None:
        self.done, self.total = 0, total
        self._progress, self._should_stop = progress, should_stop

    def check(self) -> None:
        """Before a pass: raise Stopped when the caller asks to stop."""
        if self._should_stop is not None and self._should_stop():
            raise Stopped(f"stopped after {self.done} of {self.total} forward and backward passes")

    def passed(self) -> None:
        """After a pass."""
        self.done += 1
        if self._progress is not None:
            self._progress(self.done, self.total)


def _batches(cache: ActivationCache, batch_size: int) -> list[torch.Tensor]:
    return list(torch.arange(len(cache.dataset)).split(batch_size))


def mean_gradient(
    cache: ActivationCache,
    alphas: list[float],
    metric: str,
    *,
    batch_size: int = 32,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> torch.Tensor:
    """d metric / d z_e averaged over the dataset and over uniform masks z = alpha: [E].

    One masked forward and backward per alpha and batch; ``progress`` and ``should_stop`` as in
    the module doc.
    """
    graph, model = cache.model.graph, cache.model
    n = len(cache.dataset)
    batches = _batches(cache, batch_size)
    passes = _Passes(len(alphas) * len(batches), progress, should_stop)
    total = torch.zeros(graph.n_edges, device=model.device)  # [E]
    for alpha in alphas:
        for index in batches:
            passes.check()
            batch = cache.batch(index)
            z = torch.full((graph.n_edges,), alpha, device=model.device, requires_grad=True)  # [E]
            value = objective.metric(metric, batch, cache.logits(batch, z, None))
            (grad,) = torch.autograd.grad(value * (len(index) / n), z)
            total += grad.float()
            passes.passed()
    return (total / len(alphas)).cpu()  # [E]


def eap_scores(
    cache: ActivationCache,
    *,
    metric: str | None = None,
    batch_size: int = 32,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> torch.Tensor:
    """EAP: |d metric / d z_e| at z = 1: [E]."""
    name = objective.check_metric(metric, cache.dataset)
    return mean_gradient(cache, [1.0], name, batch_size=batch_size, progress=progress,
                         should_stop=should_stop).abs()


def ig_alphas(steps: int) -> list[float]:
    """EAP-IG's interpolation points k / steps for k = 0 .. steps - 1, as Hanna et al.'s code
    (the MIB baselines) takes them: the corrupted input's end of the path and not the clean one's
    (a left Riemann sum)."""
    return [k / steps for k in range(steps)]


def eap_ig_scores(
    cache: ActivationCache,
    *,
    steps: int = 5,
    metric: str | None = None,
    batch_size: int = 32,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> torch.Tensor:
    """EAP-IG over the input embeddings (MIB's "EAP-IG-inputs"): [E].

    score(w -> r) = | Delta_w . (1/m) sum_k dL/dx_r(alpha_k) |, summed over tokens and averaged
    over the dataset, where Delta_w = y_w(clean) - y~_w is writer w's clean output minus its
    ablation value (the corrupted run's output, for MIB's patching), x_r is reader r's input, and
    the run at alpha_k = k/m, k = 0 .. m-1 (m = ``steps``; see :func:`ig_alphas`) is the plain
    model on the input embeddings y~_emb + alpha_k (y_emb(clean) - y~_emb). With "zero" or "mean"
    ablation the path starts at the zero or mean embeddings (MIB defines the corrupted one only).

    One masked forward and backward per point and batch, plus one plain forward per batch for the
    clean writer outputs. With every mask at 1 the masked forward is the plain model, whatever the
    ablation values, on the ``embeddings`` it is handed; and ``grad_deltas = Delta`` has it take
    the edge masks' gradient against Delta, so dL/dz_wr is exactly g_r(alpha) . Delta_w
    (see ``masked_forward``), every edge's term in one backward.
    """
    _check_steps(steps)
    name = objective.check_metric(metric, cache.dataset)
    model, graph = cache.model, cache.model.graph
    n, n_embed = len(cache.dataset), graph.n_embed
    alphas = ig_alphas(steps)
    batches = _batches(cache, batch_size)
    passes = _Passes(len(alphas) * len(batches), progress, should_stop)
    total = torch.zeros(graph.n_edges, device=model.device)  # [E]
    for index in batches:
        batch = cache.batch(index)
        d = batch.data
        B, T = d.clean_ids.shape
        delta = model.ablation_outputs(d.clean_ids, attention_mask=d.attention_mask)
        # delta [W, B, T, D]: the clean outputs, minus the ablation values below
        if batch.ablated is None:  # zero ablation: the path starts at zero embeddings
            start = torch.zeros_like(delta[:n_embed])  # [n_embed, B, T, D]
        else:
            start = batch.ablated[:n_embed].expand(n_embed, B, T, -1).clone()  # [n_embed, B, T, D]
            delta -= batch.ablated  # [W, B, T, D]
            batch.ablated = None  # not read again: its memory goes before the masked runs
        for alpha in alphas:
            passes.check()
            ones = torch.ones(graph.n_edges, device=model.device, requires_grad=True)  # [E]
            logits = model.logits(
                d.clean_ids, attention_mask=d.attention_mask, positions=d.positions,
                edge_mask=ones, ablation="zero", embeddings=start + alpha * delta[:n_embed],
                grad_deltas=delta,
            )  # [B, P, V]
            value = objective.metric(name, batch, logits)
            (grad,) = torch.autograd.grad(value * (len(index) / n), ones)
            total += grad.float()
            passes.passed()
    return (total / len(alphas)).abs().cpu()  # [E]


def eap_ig_edge_scores(
    cache: ActivationCache,
    *,
    steps: int = 5,
    metric: str | None = None,
    batch_size: int = 32,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> torch.Tensor:
    """EAP-IG along the edge masks ("eap_ig_edges"): |mean of d metric / d z_e along z = alpha|
    for alpha in (0, 1) by the midpoint rule, every edge mask moved together: [E]."""
    _check_steps(steps)
    name = objective.check_metric(metric, cache.dataset)
    alphas = [(k + 0.5) / steps for k in range(steps)]
    return mean_gradient(cache, alphas, name, batch_size=batch_size, progress=progress,
                         should_stop=should_stop).abs()


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
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> torch.Tensor:
    """Edge scores [E] (higher = more important) of a scored method: "eap", "eap_ig" (over the
    input embeddings, as MIB) or "eap_ig_edges" (over the edge masks).

    ``progress(done, total)`` is called after every forward and backward pass; ``should_stop()``
    is polled before every one, and True raises :class:`~edgeprune.engine.errors.Stopped`.
    """
    if method not in SCORED_METHODS:
        raise InvalidArgument(
            f"method must be one of {', '.join(SCORED_METHODS)}, not {method!r}", field="method"
        )
    _check_batch_size(batch_size)
    if method != "eap":
        _check_steps(ig_steps)
    cache = ActivationCache(model, dataset, ablation=ablation, budget_bytes=cache_bytes)
    hooks = {"progress": progress, "should_stop": should_stop}
    if method == "eap":
        return eap_scores(cache, metric=metric, batch_size=batch_size, **hooks)
    scorer = eap_ig_scores if method == "eap_ig" else eap_ig_edge_scores
    return scorer(cache, steps=ig_steps, metric=metric, batch_size=batch_size, **hooks)


def scored_circuit(
    model: CircuitModel,
    dataset: TaskDataset,
    scores: torch.Tensor,
    *,
    method: str,
    edge_count: int | None = None,
    edge_sparsity: float | None = None,
    settings: dict[str, Any] | None = None,
) -> Circuit:
    """The top-scored circuit of ``edge_count`` (or ``edge_sparsity``) live edges."""
    k = requested_edges(model.graph, edge_count=edge_count, edge_sparsity=edge_sparsity)
    if k is None:
        raise InvalidArgument("give edge_count or edge_sparsity", field="edge_count")
    target = size_target(edge_count, edge_sparsity)
    return build_circuit(
        model.graph, scores, edge_count=k, model=model.name, method=method, target=target,
        settings=settings, provenance=provenance(dataset),
    )


def provenance(dataset: TaskDataset) -> dict[str, Any]:
    return {"dataset": dataset.name, "split": dataset.split, "dataset_hash": dataset.content_hash,
            "examples": len(dataset)}


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
        total_edge_count=graph.n_edges,
        target={"acdc_threshold": threshold},
        settings={"threshold": threshold, "max_forwards": max_forwards, "ablation": ablation,
                  "batch_size": batch_size},
        provenance=provenance(dataset),
        metrics={"forwards": forwards, "tested": tested, "budget_exhausted": exhausted},
    )
    return AcdcResult(circuit=circuit, forwards=forwards, tested=tested, budget_exhausted=exhausted,
                      kl=current)
