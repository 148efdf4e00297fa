"""Circuit export: JSON round trip, Graphviz DOT and the pure-Python SVG drawing."""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape

import pytest
import torch

from edgeprune.engine.circuit import Circuit, build_circuit
from edgeprune.engine.errors import InvalidArgument
from edgeprune.engine.export import (
    EDGE_STYLES,
    circuit_to_dot,
    circuit_to_json,
    circuit_to_svg,
    export_circuit,
)
from edgeprune.engine.graph import Graph

SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def graph() -> Graph:
    return Graph.build(n_layers=4, n_heads=4, n_kv_heads=2, has_pos=True)


@pytest.fixture(scope="module")
def circuit(graph: Graph) -> Circuit:
    scores = torch.rand(graph.n_edges, generator=torch.Generator().manual_seed(0))  # [E]
    c = build_circuit(
        graph,
        scores,
        edge_count=120,
        model="tiny",
        method="eap",
        provenance={"dataset": "ioi", "content_hash": "abc"},
    )
    c.metrics = {"faithfulness": 0.75, "kl": 0.2, "accuracy": math.nan}
    return c


def test_json_round_trips_and_is_strict(circuit: Circuit) -> None:
    text = circuit_to_json(circuit)
    data = json.loads(text)  # strict JSON: NaN became null
    assert data["metrics"]["accuracy"] is None and data["metrics"]["faithfulness"] == 0.75
    assert data["edges"] == circuit.edges and data["nodes"] == circuit.nodes
    assert data["provenance"]["dataset"] == "ioi"
    back = Circuit.from_dict(data)
    assert back.edges == circuit.edges and back.edge_scores == pytest.approx(circuit.edge_scores)
    assert export_circuit(circuit.to_dict(), "json") == text  # a stored dict exports the same


def test_the_target_takes_the_apis_names(circuit: Circuit) -> None:
    """The library's export names the requested size as the service's does (CircuitSize)."""
    from edgeprune.engine.circuit import size_target

    assert json.loads(circuit_to_json(circuit))["target"] == {"edge_count": 120}
    assert size_target(None, 0.95) == {"edge_sparsity": 0.95}
    assert size_target(7, None) == {"edge_count": 7}


def _svg_titles(svg: str) -> tuple[set[str], list[str]]:
    """(node titles, edge titles) of a drawing; every element parses as XML."""
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    nodes = {
        g.find(f"{SVG}title").text for g in root.iter(f"{SVG}g") if g.find(f"{SVG}rect") is not None
    }
    edges = [p.find(f"{SVG}title").text for p in root.iter(f"{SVG}path")]
    return nodes, edges


def test_svg_is_valid_and_draws_every_node_and_edge(circuit: Circuit, graph: Graph) -> None:
    svg = circuit_to_svg(circuit, graph=graph)
    nodes, edges = _svg_titles(svg)
    assert set(circuit.nodes) <= nodes
    assert len(edges) == len(circuit.edges)
    assert {t.split(" ")[0] for t in edges} == set(circuit.edges)
    for label, colour, _, _ in EDGE_STYLES.values():  # the legend names every input kind
        assert f">{label}</text>" in svg and colour in svg
    q, k = (
        next(e for e in circuit.edges if e.endswith(".q")),
        next(e for e in circuit.edges if e.endswith(".k")),
    )
    assert re.search(rf'stroke="{EDGE_STYLES["q"][1]}"[^>]*><title>{re.escape(escape(q))} ', svg)
    assert re.search(
        rf'stroke-dasharray="{EDGE_STYLES["k"][2]}"><title>{re.escape(escape(k))} ', svg
    )


def test_svg_rows_run_from_embeddings_to_logits(circuit: Circuit, graph: Graph) -> None:
    root = ET.fromstring(circuit_to_svg(circuit, graph=graph))
    y = {}
    for g in root.iter(f"{SVG}g"):
        rect = g.find(f"{SVG}rect")
        if rect is not None:
            y[g.find(f"{SVG}title").text] = float(rect.get("y"))
    assert max(y.values()) == y["logits"] and min(y.values()) == y["tok"]
    heads = {n: v for n, v in y.items() if n.startswith("a")}
    for name, top in heads.items():
        layer = int(name[1:].split(".")[0])
        if f"m{layer}" in y:
            assert top < y[f"m{layer}"]  # a layer's heads sit above its MLP
        if f"m{layer - 1}" in y:
            assert top > y[f"m{layer - 1}"]


def test_kv_edges_of_grouped_query_models_go_to_their_group(graph: Graph) -> None:
    c = Circuit(
        model="tiny",
        method="manual",
        edges=["tok->a1.h1.k", "a1.h2->logits", "tok->a1.h1.q"],
        edge_scores={},
        nodes=[],
        total_edge_count=graph.n_edges,
    )
    with_graph = circuit_to_dot(c, graph=graph)
    assert (
        '"tok" -> "a1.h2" [color="#2ca02c", style=dashed' in with_graph
    )  # KV group 1 = heads 2, 3
    assert '"tok" -> "a1.h1" [color="#1f77b4", style=solid' in with_graph
    plain = circuit_to_dot(c)
    assert '"tok" -> "a1.h1" [color="#2ca02c", style=dashed' in plain
    c.provenance["graph"] = {"n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "has_pos": True}
    assert circuit_to_dot(c) == with_graph  # the circuit's own record of its graph


def test_dot_lists_rows_nodes_and_edges(circuit: Circuit, graph: Graph) -> None:
    dot = circuit_to_dot(circuit, graph=graph)
    assert dot.startswith("digraph circuit {") and dot.rstrip().endswith("}")
    assert dot.count(" -> ") == len(circuit.edges) + len(EDGE_STYLES)  # plus the legend's edges
    for node in circuit.nodes:
        assert f'"{node}" [shape=' in dot
    assert "rank=same; // embed" in dot and "rank=same; // logits" in dot
    assert dot.count("{") == dot.count("}")


def test_empty_circuit_and_bad_input() -> None:
    empty = Circuit(model="m", method="eap", edges=[], edge_scores={}, nodes=[], total_edge_count=10)
    assert ET.fromstring(circuit_to_svg(empty)).tag == f"{SVG}svg"
    assert "digraph" in export_circuit(empty, "dot")
    with pytest.raises(InvalidArgument) as err:
        export_circuit(empty, "gif")
    assert err.value.field == "format"
    for edges in (["tok-a0.h0.q"], ["a1.h0->a0.h1.q"], ["x->logits"]):
        bad = Circuit(
            model="m", method="eap", edges=edges, edge_scores={}, nodes=[], total_edge_count=10
        )
        with pytest.raises(InvalidArgument):
            circuit_to_svg(bad)
    with pytest.raises(InvalidArgument):
        circuit_to_json({"edges": []})
    tricky = Circuit(
        model='a "quoted" <model> & co',
        method="m",
        edges=["tok->logits"],
        edge_scores={},
        nodes=["tok", "logits"],
        total_edge_count=1,
    )
    assert ET.fromstring(circuit_to_svg(tricky)) is not None
    assert '\\"quoted\\"' in circuit_to_dot(tricky)
