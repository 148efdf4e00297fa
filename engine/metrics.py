"""How faithful a circuit is: KL, logit and probability difference, faithfulness,
accuracy and exact match on a dataset, for any circuit on any dataset.

Per-batch functions take logits at the answer positions ``[B, P, V]`` and the batch they came from
(a :class:`TaskDataset`); :func:`evaluate` runs the full model, the empty circuit (every edge
ablated) and the circuit over a whole dataset and returns plain numbers::

    evaluate(model, circuit, test_set)
    -> {"kl": .., "logit_diff": .., "faithfulness": .., "accuracy": .., "exact_match": ..,
        "edges": .., "nodes": .., ...}

Faithfulness is ``(m(C) - m(empty)) / (m(full) - m(empty))`` of the dataset's metric (logit
difference, or probability difference for greater-than), each m averaged over the dataset first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from edgeprune.engine.cache import ActivationCache
from edgeprune.engine.circuit import nodes_of_edges
from edgeprune.engine.errors import InvalidArgument
from edgeprune.engine.graph import Graph
from edgeprune.engine.masked import CircuitModel
from edgeprune.engine.tasks import TaskDataset


class HasMasks(Protocol):
    """Anything with dense masks for a graph, e.g. a :class:`~edgeprune.engine.circuit.Circuit`."""

    def edge_mask(self, graph: Graph) -> torch.Tensor: ...

    def node_mask(self, graph: Graph) -> torch.Tensor: ...


CircuitLike = HasMasks | tuple[torch.Tensor | None, torch.Tensor | None] | None


# ---- per-batch metrics -----------------------------------------------------------------------


def kl_divergence(
    full_logits: torch.Tensor, circuit_logits: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(full || circuit) per answer position, averaged over the valid positions: a scalar.

    ``full_logits`` and ``circuit_logits`` are [B, P, V] (or [B, V]); ``mask`` [B, P] (bool) marks
    the positions that count. Computed in float32; differentiable w.r.t. ``circuit_logits``.
    """
    log_p = torch.log_softmax(full_logits.float(), dim=-1)  # [B,P,V]
    log_q = torch.log_softmax(circuit_logits.float(), dim=-1)  # [B,P,V]
    p = log_p.exp()  # [B,P,V]
    kl = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)  # [B,P]; 0 log 0 = 0 (-inf logits)
    if mask is None:
        return kl.mean()
    weight = mask.to(kl.device, kl.dtype)  # [B,P]
    return (kl * weight).sum() / weight.sum().clamp(min=1)


def logit_diff(logits: torch.Tensor, dataset: TaskDataset) -> torch.Tensor:
    """Logit of the target minus logit of the distractor, averaged over answer positions: [B].

    For datasets with answer sets (greater-than): mean logit of the good tokens minus mean logit
    of the bad ones. Rows with no answer are NaN. Differentiable w.r.t. ``logits``.
    """
    logits = _three_d(logits).float()  # [B,P,V]
    if dataset.has_targets and dataset.has_distractors:
        good, good_ok = _gather(logits, dataset.target_ids)  # [B,P]
        bad, bad_ok = _gather(logits, dataset.distractor_ids)  # [B,P]
        return _row_mean(good - bad, good_ok & bad_ok & _answer_mask(dataset, logits))
    if dataset.has_answer_sets:
        good = _set_mean(logits, dataset.good_ids)  # [B,P]
        bad = _set_mean(logits, dataset.bad_ids)  # [B,P]
        return _row_mean(good - bad, _answer_mask(dataset, logits))
    raise InvalidArgument(
        f"dataset {dataset.name!r} has no target and distractor tokens, so it has no "
        "logit difference",
        field="dataset",
    )


def prob_diff(logits: torch.Tensor, dataset: TaskDataset) -> torch.Tensor:
    """Probability of the good answers minus that of the bad ones, averaged over positions: [B].

    Good/bad are the answer sets (sum of probabilities over each set) when the dataset has them,
    else the target and the distractor. Differentiable w.r.t. ``logits``.
    """
    probs = torch.softmax(_three_d(logits).float(), dim=-1)  # [B,P,V]
    valid = _answer_mask(dataset, probs)  # [B,P]
    if dataset.has_answer_sets:
        diff = _set_sum(probs, dataset.good_ids) - _set_sum(probs, dataset.bad_ids)  # [B,P]
        return _row_mean(diff, valid)
    if dataset.has_targets and dataset.has_distractors:
        good, good_ok = _gather(probs, dataset.target_ids)  # [B,P]
        bad, bad_ok = _gather(probs, dataset.distractor_ids)  # [B,P]
        return _row_mean(good - bad, good_ok & bad_ok & valid)
    raise InvalidArgument(
        f"dataset {dataset.name!r} has no answers, so it has no probability difference",
        field="dataset",
    )


def task_metric(logits: torch.Tensor, dataset: TaskDataset) -> torch.Tensor:
    """The dataset's own metric (``dataset.metric``) per example: [B]."""
    return (
        prob_diff(logits, dataset) if dataset.metric == "prob_diff" else logit_diff(logits, dataset)
    )


def correct(logits: torch.Tensor, dataset: TaskDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax is right [B,P], position has an answer [B,P]): right means the target, or any token
    of the good set."""
    logits = _three_d(logits)  # [B,P,V]
    top = logits.argmax(-1)  # [B,P]
    answer = _answer_mask(dataset, logits)  # [B,P]
    targets = dataset.target_ids.to(top.device)  # [B,P]
    if dataset.has_targets:
        return top == targets, answer & (targets >= 0)
    if dataset.good_ids is not None:
        good = dataset.good_ids.to(top.device)  # [B,K]
        hit = (top[:, :, None] == good[:, None, :]) & (good[:, None, :] >= 0)  # [B,P,K]
        return hit.any(-1), answer
    return torch.zeros_like(answer), torch.zeros_like(answer)


def _three_d(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, None, :] if logits.dim() == 2 else logits  # [B,P,V]


def _answer_mask(dataset: TaskDataset, like: torch.Tensor) -> torch.Tensor:
    assert dataset.answer_mask is not None
    return dataset.answer_mask.to(like.device)  # [B,P]


def _gather(values: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """values[b, p, ids[b, p]] [B,P] and where ids are real (>= 0) [B,P]."""
    ids = ids.to(values.device)  # [B,P]
    ok = ids >= 0  # [B,P]
    return values.gather(-1, ids.clamp(min=0)[..., None])[..., 0], ok


def _set_values(values: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """values at every token of each row's set [B,P,K], and which set entries are real [B,1,K]."""
    ids = ids.to(values.device)  # [B,K]
    B, P, _ = values.shape
    index = ids.clamp(min=0)[:, None, :].expand(B, P, -1)  # [B,P,K]
    return values.gather(-1, index), (ids >= 0)[:, None, :]


def _set_sum(values: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    assert ids is not None
    v, ok = _set_values(values, ids)  # [B,P,K]
    return (v * ok).sum(-1)  # [B,P]


def _set_mean(values: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    assert ids is not None
    v, ok = _set_values(values, ids)  # [B,P,K]
    return (v * ok).sum(-1) / ok.sum(-1).clamp(min=1)  # [B,P]


def _row_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` [B,P] over the valid positions of each row: [B] (NaN where none)."""
    weight = valid.to(values.dtype)  # [B,P]
    count = weight.sum(-1)  # [B]
    total = (torch.where(valid, values, 0.0)).sum(-1)  # [B]
    return torch.where(count > 0, total / count.clamp(min=1), torch.nan)


# ---- whole-dataset evaluation ----------------------------------------------------------------


def resolve_masks(
    model: CircuitModel, circuit: CircuitLike
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Dense (edge_mask [E], node_mask [W]) for a Circuit, an (edge, node) pair, or None (full)."""
    graph = model.graph
    if circuit is None:
        return None, None
    if isinstance(circuit, tuple):
        if len(circuit) != 2:
            raise InvalidArgument(
                "a circuit given as masks must be (edge_mask, node_mask)", field="circuit"
            )
        edges, nodes = circuit
    elif hasattr(circuit, "edge_mask") and hasattr(circuit, "node_mask"):
        edges, nodes = circuit.edge_mask(graph), circuit.node_mask(graph)
    else:
        raise InvalidArgument(
            f"cannot evaluate a {type(circuit).__name__} as a circuit", field="circuit"
        )
    for mask, size, name in (
        (edges, graph.n_edges, "edge_mask"),
        (nodes, graph.n_writers, "node_mask"),
    ):
        if mask is not None and (
            not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (size,)
        ):
            raise InvalidArgument(
                f"{name} must be a tensor of shape [{size}] for this model", field=name
            )
    return edges, nodes


def circuit_size(
    graph: Graph, edge_mask: torch.Tensor | None, node_mask: torch.Tensor | None
) -> dict[str, Any]:
    """Edges kept (effective mask z_wr * z_w > 0), the nodes they touch, the fraction kept."""
    if edge_mask is None and node_mask is None:
        n_edges = graph.n_edges
        n_nodes = graph.n_writers + 1
    else:
        weights = (
            torch.ones(graph.n_edges) if edge_mask is None else edge_mask.detach().float().cpu()
        )
        if node_mask is not None:
            weights = weights * node_mask.detach().float().cpu()[graph.edge_writer]  # [E]
        kept = torch.nonzero(weights > 0)[:, 0].tolist()
        n_edges = len(kept)
        n_nodes = len(nodes_of_edges([graph.edges[i] for i in kept], graph))
    return {
        "edges": n_edges,
        "nodes": n_nodes,
        "edges_total": graph.n_edges,
        "edge_fraction": n_edges / graph.n_edges,
    }


class _Totals:
    """Running sums of one model variant's metrics over a dataset."""

    def __init__(self) -> None:
        self.kl = self.kl_n = 0.0
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}
        self.hits = self.answers = 0.0
        self.same = self.positions = 0.0

    def add_rows(self, key: str, values: torch.Tensor) -> None:
        ok = ~torch.isnan(values)  # [B]
        self.sums[key] = self.sums.get(key, 0.0) + float(values[ok].sum())
        self.counts[key] = self.counts.get(key, 0.0) + float(ok.sum())

    def mean(self, key: str) -> float:
        return self.sums[key] / self.counts[key] if self.counts.get(key) else math.nan


def evaluate(
    model: CircuitModel,
    circuit: CircuitLike,
    dataset: TaskDataset,
    *,
    ablation: str = "corrupted",
    batch_size: int = 32,
    cache: ActivationCache | None = None,
) -> dict[str, Any]:
    """Metrics of one circuit on ``dataset`` (see :func:`evaluate_many`)."""
    return evaluate_many(
        model, [circuit], dataset, ablation=ablation, batch_size=batch_size, cache=cache
    )[0]


@torch.no_grad()
def evaluate_many(
    model: CircuitModel,
    circuits: Sequence[CircuitLike],
    dataset: TaskDataset,
    *,
    ablation: str = "corrupted",
    batch_size: int = 32,
    cache: ActivationCache | None = None,
) -> list[dict[str, Any]]:
    """Metrics of every circuit on ``dataset``, running the full model and the empty circuit once.

    A circuit is a Circuit (anything with ``edge_mask(graph)`` / ``node_mask(graph)``), a pair of
    dense masks ``(edge_mask [E] | None, node_mask [W] | None)``, or None (the full model). Each
    result holds: kl (KL(full || circuit), mean over answer positions), the dataset's metric for the
    circuit, the full model and the empty circuit (``logit_diff`` / ``full_logit_diff`` /
    ``empty_logit_diff``, and the ``prob_diff`` family where the dataset defines it), faithfulness,
    accuracy, exact_match (circuit argmax == full-model argmax), edges, nodes, edges_total,
    edge_fraction and examples. Metrics the dataset has no answers for are left out.
    ``cache``: an ActivationCache of this model, dataset and ablation to reuse.
    """
    if batch_size < 1:
        raise InvalidArgument(
            f"batch_size must be at least 1, got {batch_size}", field="batch_size"
        )
    if cache is None:
        cache = ActivationCache(model, dataset, ablation=ablation)
    elif cache.dataset is not dataset or cache.ablation != ablation:
        raise InvalidArgument(
            "the activation cache belongs to another dataset or ablation", field="cache"
        )
    masks = [resolve_masks(model, c) for c in circuits]
    device_masks = [
        tuple(None if m is None else m.to(model.device, model.dtype) for m in pair)
        for pair in masks
    ]
    empty = torch.zeros(model.graph.n_edges, device=model.device, dtype=model.dtype)  # [E]
    keys = _metric_keys(dataset)
    full, void = _Totals(), _Totals()
    totals = [_Totals() for _ in circuits]
    for index in torch.arange(len(dataset)).split(batch_size):
        # the ablation values go into the cache's one reused buffer (each batch is done with
        # before the next), so a batch's [W, B, T, D] is not allocated twice over
        batch = cache.batch(index, scratch=True)
        data, reference = batch.data, batch.clean_logits  # [B,P,V]
        _accumulate(full, reference, reference, data, keys)
        _accumulate(void, cache.logits(batch, empty, None), reference, data, keys)
        for total, circuit, (edge_mask, node_mask) in zip(
            totals, circuits, device_masks, strict=True
        ):
            logits = reference if circuit is None else cache.logits(batch, edge_mask, node_mask)
            _accumulate(total, logits, reference, data, keys)
    return [
        _summary(total, full, void, dataset, keys, circuit_size(model.graph, *pair))
        for total, pair in zip(totals, masks, strict=True)
    ]


def _metric_keys(dataset: TaskDataset) -> list[str]:
    keys = []
    if (dataset.has_targets and dataset.has_distractors) or dataset.has_answer_sets:
        keys = ["logit_diff", "prob_diff", "pairwise_accuracy"]
    return keys


def _accumulate(
    total: _Totals,
    logits: torch.Tensor,
    reference: torch.Tensor,
    data: TaskDataset,
    keys: list[str],
) -> None:
    mask = _answer_mask(data, logits)  # [B,P]
    n = float(mask.sum())
    total.kl += float(kl_divergence(reference, logits, mask)) * n
    total.kl_n += n
    if "logit_diff" in keys:
        diff = logit_diff(logits, data)  # [B]
        total.add_rows("logit_diff", diff)
        total.add_rows("prob_diff", prob_diff(logits, data))
        # the target (or the good set) beats the distractor (or the bad set): NaN rows stay NaN
        total.add_rows("pairwise_accuracy", torch.where(diff.isnan(), diff, (diff > 0).float()))
    hit, has_answer = correct(logits, data)  # [B,P]
    total.hits += float((hit & has_answer).sum())
    total.answers += float(has_answer.sum())
    same = logits.argmax(-1) == reference.argmax(-1)  # [B,P]
    total.same += float((same & mask).sum())
    total.positions += n


def _summary(
    total: _Totals,
    full: _Totals,
    void: _Totals,
    dataset: TaskDataset,
    keys: list[str],
    size: dict[str, Any],
) -> dict[str, Any]:
    out: dict[str, Any] = {"kl": total.kl / max(total.kl_n, 1.0),
                           "empty_kl": void.kl / max(void.kl_n, 1.0)}
    for key in keys:
        out[key] = total.mean(key)
        out[f"full_{key}"] = full.mean(key)
        out[f"empty_{key}"] = void.mean(key)
    if keys:
        m = dataset.metric
        out["faithfulness"] = faithfulness(out[m], out[f"full_{m}"], out[f"empty_{m}"])
    if total.answers:
        out["accuracy"] = total.hits / total.answers
        out["full_accuracy"] = full.hits / full.answers
    out["exact_match"] = total.same / max(total.positions, 1.0)
    out["examples"] = len(dataset)
    out.update(size)
    return out


def faithfulness(circuit: float, full: float, empty: float) -> float:
    """``(m(C) - m(empty)) / (m(full) - m(empty))``; NaN when the full model and the empty circuit
    score the same (the ratio is undefined)."""
    denominator = full - empty
    if not math.isfinite(denominator) or abs(denominator) < 1e-12:
        return math.nan
    return (circuit - empty) / denominator + 0.0  # + 0.0: never report -0.0
