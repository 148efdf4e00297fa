"""The edge graph: names, order, upstream prefixes and sizes."""

from __future__ import annotations

import itertools
import re

import pytest

from edgeprune.engine.errors import InvalidArgument
from edgeprune.engine.graph import Graph


def test_gpt2_small_sizes():
    g = Graph.build(12, 12, 12, has_pos=True)
    assert g.n_writers == 158
    assert g.n_edges == len(g.edges) == 32_936


def test_smollm2_135m_sizes():
    g = Graph.build(30, 9, 3, has_pos=False)
    assert g.n_writers == 301
    assert g.n_readers == 30 * (9 + 3 + 3 + 1) + 1
    assert g.n_edges == 70_651


def test_names_and_order():
    g = Graph.build(2, 2, 1, has_pos=True)
    assert g.writers == ("tok", "pos", "a0.h0", "a0.h1", "m0", "a1.h0", "a1.h1", "m1")
    assert g.readers == (
        "a0.h0.q",
        "a0.h1.q",
        "a0.h0.k",
        "a0.h0.v",
        "m0",
        "a1.h0.q",
        "a1.h1.q",
        "a1.h0.k",
        "a1.h0.v",
        "m1",
        "logits",
    )
    assert g.edges[:3] == ("tok->a0.h0.q", "pos->a0.h0.q", "tok->a0.h1.q")
    assert g.edges[-1] == "m1->logits"
    assert "a0.h1->m0" in g.edges and "m0->m0" not in g.edges


def _upstream_by_rule(g: Graph, reader: str) -> set[str]:
    """The graph's definition in words, independently of the prefix layout."""
    embeds = {"tok", "pos"} & set(g.writers)
    if reader == "logits":
        return set(g.writers)
    layer = int(re.match(r"^[am](\d+)", reader)[1])
    before = {
        w
        for w in g.writers
        if re.match(r"^[am](\d+)", w) and int(re.match(r"^[am](\d+)", w)[1]) < layer
    }
    if reader.startswith("m"):
        before |= {f"a{layer}.h{h}" for h in range(g.n_heads)}
    return embeds | before


@pytest.mark.parametrize("shape", [(3, 4, 2, False), (2, 3, 3, True)])
def test_upstream_sets_are_prefixes_matching_the_rule(shape):
    g = Graph.build(*shape)
    for r, n in zip(g.readers, g.n_upstream):
        assert set(g.writers[:n]) == _upstream_by_rule(g, r), r
    edges = [(w, r) for r in g.readers for w in g.writers if w in _upstream_by_rule(g, r)]
    assert len(edges) == g.n_edges
    assert set(g.edges) == {f"{w}->{r}" for w, r in edges}


def test_indices_round_trip():
    g = Graph.build(3, 4, 2, has_pos=True)
    for i, name in enumerate(g.edges):
        assert g.edge_index(name) == i
        w, r = name.split("->")
        assert g.writers[int(g.edge_writer[i])] == w
        assert g.readers[int(g.edge_reader[i])] == r
    assert [g.writer_index(w) for w in g.writers] == list(range(g.n_writers))
    assert [g.reader_index(r) for r in g.readers] == list(range(g.n_readers))


def test_reader_groups_cover_edges_contiguously():
    g = Graph.build(3, 4, 2, has_pos=False)
    groups = [f(layer) for layer in range(3) for f in (g.attn_group, g.mlp_group)] + [
        g.logits_group()
    ]
    assert groups[0].edges.start == 0 and groups[-1].edges.stop == g.n_edges
    for a, b in itertools.pairwise(groups):
        assert a.edges.stop == b.edges.start and a.readers.stop == b.readers.start
    for group in groups:
        count = group.readers.stop - group.readers.start
        assert group.edges.stop - group.edges.start == count * group.n_upstream
        assert all(
            g.n_upstream[r] == group.n_upstream
            for r in range(group.readers.start, group.readers.stop)
        )
    assert g.attn_group(1).n_upstream == g.layer_start(1) == 1 + 5


def test_reader_nodes():
    g = Graph.build(2, 4, 2, has_pos=False)
    assert g.reader_node("a1.h3.q") == "a1.h3"
    assert g.reader_node("a1.h1.k") == "a1.h2"
    assert g.reader_heads("a1.h1.v") == ("a1.h2", "a1.h3")
    assert g.reader_heads("a0.h2.q") == ("a0.h2",)
    assert g.reader_node("m1") == "m1"
    assert g.reader_node("logits") == "logits"


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda g: g.edge_index("a1.h0->a0.h0.q"), "edge_mask"),  # downstream writer
        (lambda g: g.edge_index("tok-a0.h0.q"), "edge_mask"),
        (lambda g: g.edge_index("tok->a9.h0.q"), "edge_mask"),
        (lambda g: g.writer_index("a0.h9"), "node_mask"),
        (lambda g: g.reader_node("a0.h3.k"), "edge_mask"),  # only 2 KV heads
    ],
)
def test_unknown_names_raise(call, field):
    with pytest.raises(InvalidArgument) as err:
        call(Graph.build(2, 4, 2, has_pos=False))
    assert err.value.field == field


def test_bad_shapes_raise():
    with pytest.raises(InvalidArgument):
        Graph.build(2, 4, 3, has_pos=False)
    with pytest.raises(InvalidArgument):
        Graph.build(0, 4, 4, has_pos=False)
