"""Make a circuit minimal: remove every kept edge that the training loss does not need.

Edge Pruning's ``kl_tolerance`` cut keeps the fewest top-ranked edges whose training loss stays
within the tolerance, so the circuit is only as small as the ranking is good. On programs whose
components saturate (near-hard attention feeding step-function MLPs, chains of lookup MLPs) the
masks that start on get no KL gradient, fall together, and the necessary edges, whose loss is flat
between mask 0 and 0.5, rank among the useless ones: the cut must then keep everything above
them. This pass fixes the result, not the ranking: it walks the kept edges from the lowest score
up and removes those whose removal keeps the loss within the tolerance.

Every trial also drops the edges that the removal leaves on no path from an embedding to the
logits (``live_edges``) and measures exactly the circuit that would be returned, so dead edges
never need a trial of their own. A circuit cut from a poor ranking is mostly useless edges, so
the walk removes groups: after a successful removal the next group is twice as large, after a
failed one it is halved and retried, and a failed single edge is kept (adaptive group testing;
a needed edge costs about log2 of the group size in failed trials instead of every useless edge
costing a trial). Passes repeat until one removes nothing; such a pass tried every edge alone,
so the result is 1-minimal: no single kept edge can go without breaking the tolerance.

A trial is one masked forward pass per batch of the training set, stopped at the first batch
that already exceeds the tolerance (every loss is a mean of non-negative terms), so a failed trial
usually costs one forward pass. ``max_forwards`` bounds the whole pass; edges left untested when
it runs out stay in the circuit, which therefore stays within the tolerance.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from edgeprune.engine import objective
from edgeprune.engine.cache import ActivationCache
from edgeprune.engine.circuit import live_edges
from edgeprune.engine.errors import InvalidArgument

log = logging.getLogger(__name__)

# Forward passes Edge Pruning's kl_tolerance cut may spend making its circuit minimal. A small
# program's pass from even a poor ranking needs a few hundred; on a large model the bound keeps the
# pass to minutes (the untested edges stay in the circuit).
MAX_FORWARDS = 1000


@dataclass
class RefineResult:
    """The minimal circuit and what finding it cost."""

    keep: torch.Tensor  # BoolTensor [E]: the circuit's edges, every one live
    loss: float  # training loss of ``keep`` (NaN when the budget did not allow measuring it)
    forwards: int  # masked forward passes spent (one per batch evaluated)
    trials: int  # removals tried (of one edge or of a group)
    removed: int  # edges removed (the tested ones and the dead edges they left)
    passes: int  # passes over the kept edges, the last one removing nothing unless cut short
    budget_exhausted: bool  # True: some edges were left untested
    stopped: bool  # should_stop() ended the pass early


class _Loss:
    """The training loss of a binary edge mask, with early exit above a bound; counts forwards."""

    def __init__(self, cache: ActivationCache, loss: str, batch_size: int) -> None:
        self.cache, self.loss = cache, loss
        self.n = len(cache.dataset)
        self.chunks = list(torch.arange(self.n).split(batch_size))
        self.forwards = 0

    @torch.no_grad()
    def __call__(self, keep: torch.Tensor, bound: float = float("inf")) -> float:
        """Mean loss of the circuit ``keep`` [E] over the dataset, weighted per batch as in
        ``prune.smallest_faithful``; once the partial sum exceeds ``bound`` it is returned as is."""
        model = self.cache.model
        mask = keep.to(model.device, model.dtype)  # [E]
        total = 0.0
        for index in self.chunks:
            batch = self.cache.batch(index, scratch=True)  # done with before the next one
            logits = self.cache.logits(batch, mask, None)  # [B, P, V]
            total += float(objective.loss(self.loss, batch, logits)) * len(index) / self.n
            self.forwards += 1
            if total > bound:
                break
        return total


def minimal_circuit(
    cache: ActivationCache,
    keep: torch.Tensor,
    scores: torch.Tensor,
    loss: str,
    tolerance: float,
    *,
    batch_size: int = 32,
    max_forwards: int = MAX_FORWARDS,
    should_stop: Callable[[], bool] | None = None,
) -> RefineResult:
    """Remove from ``keep`` [E] (bool) every edge whose removal keeps ``loss`` within ``tolerance``.

    Edges are tried from the lowest of ``scores`` [E] up, in groups (see the module doc; ties: the
    edge nearest the logits first, so that removals leave upstream edges dead before they are
    tried). The input circuit should be within the tolerance; if it is not, nothing is removed.
    At most ``max_forwards`` masked forward passes are spent, the input circuit's own loss
    included. ``should_stop()`` is polled before every trial.
    """
    graph = cache.model.graph
    if keep.shape != (graph.n_edges,) or scores.shape != (graph.n_edges,):
        raise InvalidArgument(f"keep and scores must have shape [{graph.n_edges}]", field="keep")
    if isinstance(max_forwards, bool) or not isinstance(max_forwards, int) or max_forwards < 0:
        raise InvalidArgument(f"max_forwards must be an integer >= 0, got {max_forwards!r}",
                              field="max_forwards")
    loss_of = _Loss(cache, loss, batch_size)
    n_batches = len(loss_of.chunks)
    keep = live_edges(graph, keep.detach().cpu().bool())  # [E]
    start = int(keep.sum())
    if n_batches > max_forwards:
        return RefineResult(keep=keep, loss=math.nan, forwards=0, trials=0, removed=0, passes=0,
                            budget_exhausted=True, stopped=False)
    current = loss_of(keep)
    exhausted = stopped = False
    trials = passes = 0
    if current > tolerance:
        log.info("the circuit's loss %.3g is above the tolerance %.3g; nothing removed", current,
                 tolerance)
        return RefineResult(keep=keep, loss=current, forwards=loss_of.forwards, trials=0,
                            removed=0, passes=0, budget_exhausted=False, stopped=False)

    # Lowest score first; among equal scores the latest edge (nearest the logits) first.
    latest_first = torch.arange(graph.n_edges - 1, -1, -1)  # [E]
    values = scores.detach().float().cpu()[latest_first]  # [E]
    order = latest_first[torch.argsort(values, stable=True)]  # [E]
    changed = True
    while changed and not (exhausted or stopped):
        changed = False
        passes += 1
        pending = order[keep[order]]  # [n] the kept edges in order
        i, size = 0, 1
        while i < len(pending):
            group = pending[i : i + size]
            group = group[keep[group]]  # [<= size] those no earlier removal left dead
            if len(group) == 0:
                i += size
                continue
            if should_stop is not None and should_stop():
                stopped = True
                break
            if loss_of.forwards + n_batches > max_forwards:
                exhausted = True
                break
            trial = keep.clone()
            trial[group] = False
            trial = live_edges(graph, trial)  # [E]
            value = loss_of(trial, bound=tolerance)
            trials += 1
            if value <= tolerance:
                keep, current, changed = trial, value, True
                i, size = i + size, size * 2
            elif size > 1:
                size //= 2  # retry the front half of the group
            else:
                i += 1  # this edge is needed
        if exhausted or stopped:
            break
    if exhausted:
        log.info("the minimal-circuit pass ran out of its %d forward passes after %d trials",
                 max_forwards, trials)
    return RefineResult(keep=keep, loss=current, forwards=loss_of.forwards, trials=trials,
                        removed=start - int(keep.sum()), passes=passes,
                        budget_exhausted=exhausted, stopped=stopped)
