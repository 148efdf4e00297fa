"""Circuits: dead-edge removal, bisection to a requested size, serialisation (no model needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeprune.engine.circuit import (
    Circuit,
    build_circuit,
    effective_sparsity,
    live_edges,
    nodes_of_edges,
    requested_edges,
    select_top,
    top_edges,
)
from edgeprune.engine.errors import InvalidArgument
from edgeprune.engine.export import graph_of
from edgeprune.engine.graph import Graph

GRAPH = Graph.build(n_layers=2, n_heads=2, n_kv_heads=1, has_pos=True)


def keep_of(*edges: str) -> torch.Tensor:
    keep = torch.zeros(GRAPH.n_edges, dtype=torch.bool)  # [E]
    for edge in edges:
        keep[GRAPH.edge_index(edge)] = True
    return keep


def names(mask: torch.Tensor) -> set[str]:
    return {GRAPH.edges[i] for i in torch.nonzero(mask).flatten().tolist()}


def test_a_complete_path_is_live() -> None:
    path = ("tok->a0.h1.q", "a0.h1->m1", "m1->logits")
    assert names(live_edges(GRAPH, keep_of(*path))) == set(path)


def test_edges_off_any_path_are_dead() -> None:
    # a0.h0 is reached but reaches nothing; m1 reaches logits but nothing reaches it.
    keep = keep_of("tok->a0.h0.q", "m1->logits", "pos->logits")
    assert names(live_edges(GRAPH, keep)) == {"pos->logits"}


def test_kv_reader_feeds_every_head_of_its_group() -> None:
    # One KV head: a1.h0.k feeds both a1.h0 and a1.h1.
    keep = keep_of("tok->a1.h0.k", "a1.h1->logits")
    assert names(live_edges(GRAPH, keep)) == {"tok->a1.h0.k", "a1.h1->logits"}


def test_a_node_off_kills_its_edges() -> None:
    path = ("tok->a0.h1.q", "a0.h1->m1", "m1->logits")
    nodes = torch.ones(GRAPH.n_writers, dtype=torch.bool)  # [W]
    nodes[GRAPH.writer_index("a0.h1")] = False
    assert names(live_edges(GRAPH, keep_of(*path), nodes)) == set()
    assert effective_sparsity(GRAPH, keep_of(*path), nodes) == 1.0
    assert effective_sparsity(GRAPH, keep_of(*path)) == pytest.approx(1 - 3 / GRAPH.n_edges)


def test_full_graph_is_all_live() -> None:
    assert bool(live_edges(GRAPH, torch.ones(GRAPH.n_edges, dtype=torch.bool)).all())


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(0, GRAPH.n_edges))
def test_select_top_is_the_largest_cut_within_the_size(seed: int, k: int) -> None:
    scores = torch.randn(GRAPH.n_edges, generator=torch.Generator().manual_seed(seed))  # [E]
    keep = select_top(GRAPH, scores, k)
    assert int(keep.sum()) <= k
    assert torch.equal(keep, live_edges(GRAPH, keep))  # nothing dead left
    # Live counts grow with the number of top edges taken, so taking one more would overshoot.
    counts = [int(live_edges(GRAPH, top_edges(GRAPH, scores, m)).sum()) for m in range(GRAPH.n_edges + 1)]
    assert counts == sorted(counts)
    m = max(i for i, c in enumerate(counts) if c <= k)
    prefix = live_edges(GRAPH, top_edges(GRAPH, scores, m))
    assert bool(keep[prefix].all())  # the cut holds the bisection's prefix ...
    for extra in torch.nonzero(keep & ~prefix).flatten().tolist():  # ... topped up edge by edge
        alone = prefix.clone()
        alone[extra] = True
        assert int(live_edges(GRAPH, alone).sum()) == counts[m] + 1


# SmolLM2-135M's graph (30 layers, 9 heads, 3 KV heads): 70,651 edges
SMOLLM2_GRAPH = Graph.build(n_layers=30, n_heads=9, n_kv_heads=3, has_pos=False)


@pytest.mark.parametrize("seed", [0, 2, 4])
def test_select_top_reaches_a_percentage_size_exactly(seed: int) -> None:
    """1 % of the edges is round(0.01 * E) live edges, not the few hundred or the 700-odd that a
    cut of the ranking stops at when the next edge revives a dead branch; the same from a
    sparsity given as a float32 (as the API carries it)."""
    graph = SMOLLM2_GRAPH
    sparsity = float(np.float32(0.99))
    k = requested_edges(graph, edge_sparsity=sparsity)
    assert k == round(0.01 * graph.n_edges) == 707
    scores = torch.randn(graph.n_edges, generator=torch.Generator().manual_seed(seed))  # [E]
    keep = select_top(graph, scores, k)
    assert int(keep.sum()) == k
    assert torch.equal(keep, live_edges(graph, keep))
    # the largest prefix of the ranking within the size falls short on these scores
    lo, hi = 0, graph.n_edges
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if live_edges(graph, top_edges(graph, scores, mid)).sum() <= k else (lo, mid)
    assert int(live_edges(graph, top_edges(graph, scores, lo)).sum()) < k


def test_select_top_without_dead_edge_removal_takes_exactly_k() -> None:
    scores = torch.arange(GRAPH.n_edges, dtype=torch.float32)  # [E]
    keep = select_top(GRAPH, scores, 7, prune_dead=False)
    assert torch.equal(torch.nonzero(keep).flatten(), torch.arange(GRAPH.n_edges - 7, GRAPH.n_edges))


def test_requested_edges() -> None:
    assert requested_edges(GRAPH, edge_count=5) == 5
    assert requested_edges(GRAPH, edge_sparsity=1.0) == 0
    assert requested_edges(GRAPH, edge_sparsity=0.0) == GRAPH.n_edges
    assert requested_edges(GRAPH) is None
    for bad in ({"edge_count": -1}, {"edge_count": GRAPH.n_edges + 1}, {"edge_sparsity": 1.5},
                {"edge_count": 3, "edge_sparsity": 0.5}, {"edge_sparsity": float("nan")}, {"edge_count": 2.5}):
        with pytest.raises(InvalidArgument):
            requested_edges(GRAPH, **bad)


def test_circuit_round_trip_and_masks() -> None:
    scores = torch.randn(GRAPH.n_edges, generator=torch.Generator().manual_seed(0))  # [E]
    circuit = build_circuit(GRAPH, scores, edge_count=12, model="m", method="eap",
                            provenance={"dataset": "ioi"})
    again = Circuit.from_dict(json.loads(json.dumps(circuit.to_dict())))
    assert again == circuit
    mask = circuit.edge_mask(GRAPH)  # [E]
    assert names(mask.bool()) == set(circuit.edges)
    assert circuit.edge_count == int(mask.sum()) <= 12
    assert circuit.edge_sparsity == pytest.approx(1 - circuit.edge_count / GRAPH.n_edges)
    assert set(circuit.edge_scores) == set(circuit.edges)
    nodes = circuit.node_mask(GRAPH)  # [W]
    writers = {e.split("->")[0] for e in circuit.edges}
    assert {w for w, on in zip(GRAPH.writers, nodes.tolist()) if on} >= writers


def test_circuit_records_its_graph_shape() -> None:
    scores = torch.randn(GRAPH.n_edges, generator=torch.Generator().manual_seed(1))  # [E]
    circuit = build_circuit(GRAPH, scores, edge_count=5, model="m", method="eap",
                            provenance={"dataset": "ioi"})
    assert circuit.provenance["dataset"] == "ioi"
    assert graph_of(circuit) == GRAPH


def test_nodes_of_edges_uses_the_kv_group() -> None:
    assert nodes_of_edges(["tok->a1.h0.k"], GRAPH) == ["tok", "a1.h0", "a1.h1"]


def test_from_dict_errors_name_the_field() -> None:
    with pytest.raises(InvalidArgument) as err:
        Circuit.from_dict({"model": "m", "method": "eap", "total_edge_count": 3})
    assert err.value.field == "circuit.edges"
    with pytest.raises(InvalidArgument):
        Circuit.from_dict([1, 2])  # type: ignore[arg-type]
    bad = Circuit(model="m", method="eap", edges=["tok->nowhere"], edge_scores={}, nodes=[],
                  total_edge_count=GRAPH.n_edges)
    with pytest.raises(InvalidArgument):
        bad.edge_mask(GRAPH)
    other = Circuit(model="m", method="eap", edges=[], edge_scores={}, nodes=[], total_edge_count=5)
    with pytest.raises(InvalidArgument):
        other.edge_mask(GRAPH)
