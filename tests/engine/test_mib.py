"""MIB / EAP-IG circuit files: export, import, their round trip and bad files."""

from __future__ import annotations

import json

import pytest
import torch

from edgeprune.engine.circuit import Circuit, circuit_from_keep
from edgeprune.engine.errors import InvalidArgument
from edgeprune.engine.export import export_circuit
from edgeprune.engine.graph import Graph
from edgeprune.engine.mib import export_mib, from_mib, mib_edges, parse_mib, to_mib

GRAPHS = {
    "gpt2": Graph.build(n_layers=2, n_heads=3, n_kv_heads=3, has_pos=True),
    "llama_gqa": Graph.build(n_layers=2, n_heads=4, n_kv_heads=2, has_pos=False),
    "tracr": Graph.build(n_layers=3, n_heads=1, n_kv_heads=1, has_pos=True),
    "neox": Graph.build(n_layers=2, n_heads=2, n_kv_heads=2, has_pos=False,
                        parallel_attn_mlp=True),
}


def _circuit(graph: Graph, seed: int) -> Circuit:
    """A random circuit that MIB's naming can hold exactly: ``pos`` edges kept and scored as the
    ``tok`` edges into the same reader (MIB has one ``input`` writer for both)."""
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(graph.n_edges, generator=gen) < 0.3  # [E]
    scores = torch.randn(graph.n_edges, generator=gen)  # [E], signed as EAP's
    if graph.has_pos:
        for r in range(graph.n_readers):
            tok, pos = graph.reader_offsets[r], graph.reader_offsets[r] + 1
            keep[pos], scores[pos] = keep[tok], scores[tok]
    return circuit_from_keep(graph, keep, scores, model="tiny", method="eap",
                             target={"edge_count": int(keep.sum())})


@pytest.mark.parametrize("name", list(GRAPHS))
def test_export_then_import_gives_the_same_circuit(name: str) -> None:
    graph = GRAPHS[name]
    circuit = _circuit(graph, seed=len(name))
    text = export_mib(circuit, graph, d_model=64)
    data = json.loads(text)
    assert data["cfg"] == {"n_layers": graph.n_layers, "n_heads": graph.n_heads,
                           "parallel_attn_mlp": graph.parallel_attn_mlp, "d_model": 64}
    assert len(data["edges"]) == len(mib_edges(graph))  # every edge of the graph is listed
    back = parse_mib(text, graph, max_bytes=len(text), model="tiny", method="eap")
    assert back.edges == circuit.edges
    assert back.nodes == circuit.nodes
    assert back.edge_scores == pytest.approx(circuit.edge_scores)
    assert back.total_edge_count == graph.n_edges and back.method == "eap"


def test_gpt2_small_has_mibs_edge_count() -> None:
    """MIB's GPT-2 small graph has 32,491 edges (ours 32,936: tok and pos are two writers)."""
    graph = Graph.build(n_layers=12, n_heads=12, n_kv_heads=12, has_pos=True)
    assert len(mib_edges(graph)) == 32_491 and graph.n_edges == 32_936


def test_gqa_key_and_value_edges_are_exported_per_head() -> None:
    graph = GRAPHS["llama_gqa"]  # 4 query heads share 2 KV heads: group of 2
    edge = "a0.h1->a1.h0.k"  # KV head 0 of layer 1 serves query heads 0 and 1
    circuit = circuit_from_keep(graph, _only(graph, edge), torch.full((graph.n_edges,), 2.5),
                                model="tiny", method="eap", target={})
    data = to_mib(circuit, graph)
    kept = {n for n, e in data["edges"].items() if e["in_graph"]}
    assert kept == {"a0.h1->a1.h0<k>", "a0.h1->a1.h1<k>"}
    assert data["edges"]["a0.h1->a1.h1<k>"]["score"] == 2.5
    assert all(e["score"] == 0.0 for e in data["edges"].values() if not e["in_graph"])
    assert {n for n, v in data["nodes"].items() if v["in_graph"]} == {
        "a0.h1", "a1.h0", "a1.h1", "logits"}


def test_edges_outside_the_circuit_score_below_every_kept_one() -> None:
    graph = GRAPHS["gpt2"]
    scores = torch.full((graph.n_edges,), -4.0)  # negative log-alphas can still be kept
    circuit = circuit_from_keep(graph, _only(graph, "m1->logits"), scores, model="tiny",
                                method="edge_pruning", target={})
    edges = to_mib(circuit, graph)["edges"]
    assert edges["m1->logits"] == {"score": -4.0, "in_graph": True}
    assert max(e["score"] for e in edges.values() if not e["in_graph"]) < -4.0


def test_a_hand_written_file_imports_as_expected() -> None:
    """EAP-IG's names: ``input`` is tok and pos; ``<k>`` of both heads of a KV group merge."""
    graph = Graph.build(n_layers=1, n_heads=2, n_kv_heads=1, has_pos=True)
    doc = {
        "cfg": {"n_layers": 1, "n_heads": 2, "parallel_attn_mlp": False, "d_model": 8},
        "nodes": {"input": True, "a0.h0": True, "a0.h1": True, "m0": True, "logits": True},
        "edges": {
            "input->a0.h1<q>": {"score": 0.5, "in_graph": True},
            "input->a0.h0<k>": {"score": 0.1, "in_graph": True},
            "input->a0.h1<k>": {"score": -0.3, "in_graph": True},
            "a0.h0->m0": {"score": 0.2, "in_graph": True},
            "m0->logits": {"score": 0.9, "in_graph": True},
            "a0.h1->logits": {"score": 7.0, "in_graph": False},
            "input->m0": {"score": None, "in_graph": True},
        },
    }
    circuit = from_mib(doc, graph, model="tiny")
    assert circuit.method == "imported"
    assert circuit.edges == [  # graph order
        "tok->a0.h1.q", "pos->a0.h1.q", "tok->a0.h0.k", "pos->a0.h0.k", "tok->m0", "pos->m0",
        "a0.h0->m0", "m0->logits"]
    assert circuit.edge_scores == {
        "tok->a0.h1.q": 0.5, "pos->a0.h1.q": 0.5, "tok->a0.h0.k": -0.3, "pos->a0.h0.k": -0.3,
        "a0.h0->m0": 0.2, "m0->logits": 0.9}  # the KV group's largest magnitude; None: no score
    assert circuit.nodes == ["tok", "pos", "a0.h0", "a0.h1", "m0", "logits"]
    assert circuit.total_edge_count == graph.n_edges and circuit.edge_mask(graph).sum() == 8


def test_tok_without_pos_comes_back_as_both() -> None:
    graph = GRAPHS["gpt2"]
    circuit = circuit_from_keep(graph, _only(graph, "tok->logits"), torch.ones(graph.n_edges),
                                model="tiny", method="eap", target={})
    back = from_mib(to_mib(circuit, graph), graph, model="tiny")
    assert back.edges == ["tok->logits", "pos->logits"]


def test_export_circuit_takes_mib_with_the_recorded_graph() -> None:
    graph = GRAPHS["llama_gqa"]
    circuit = _circuit(graph, seed=3)
    circuit.provenance["d_model"] = 32
    text = export_circuit(circuit.to_dict(), "mib")  # the graph from the circuit's provenance
    assert text == export_circuit(circuit, "mib", graph=graph)
    assert json.loads(text)["cfg"]["d_model"] == 32
    del circuit.provenance["graph"]
    with pytest.raises(InvalidArgument, match="records no graph"):
        export_circuit(circuit, "mib")


def _good(graph: Graph) -> dict:
    doc = to_mib(_circuit(graph, seed=1), graph, d_model=16)
    del doc["edges"]["input->logits"]  # room for one more name: files may leave some out
    del doc["nodes"]["logits"]
    return doc


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d["cfg"].update(n_layers=3), "cfg.n_layers is 3; the model has 2"),
    (lambda d: d["cfg"].update(n_heads="4"), "cfg.n_heads must be an integer"),
    (lambda d: d["cfg"].update(parallel_attn_mlp=True), "cfg.parallel_attn_mlp is True"),
    (lambda d: d.pop("cfg"), "cfg must be a JSON object"),
    (lambda d: d["edges"].update({"input->a0.h4<q>": {"score": 1, "in_graph": True}}),
     "unknown edge 'input->a0.h4<q>'"),
    (lambda d: d["edges"].update({"a1.h0->a0.h0<q>": {"score": 1, "in_graph": False}}),
     "unknown edge 'a1.h0->a0.h0<q>'"),
    (lambda d: d["edges"].update({"tok->a0.h0.q": {"score": 1, "in_graph": True}}),
     "unknown edge 'tok->a0.h0.q'"),
    (lambda d: d["edges"].update({"m0->logits": {"score": 1, "in_graph": "yes"}}),
     "must be an object with a boolean in_graph"),
    (lambda d: d["edges"].update({"m0->logits": {"score": "high", "in_graph": True}}),
     "score must be a number or null"),
    (lambda d: d["nodes"].update({"a9.h0": {"in_graph": True}}), "unknown node 'a9.h0'"),
    (lambda d: d["nodes"].update({"m0": 1}), "nodes['m0'] must be a boolean"),
    (lambda d: [e.update(in_graph=False) for e in d["edges"].values()], "no edge has in_graph"),
])
def test_bad_files_name_the_problem(change, message: str) -> None:
    graph = GRAPHS["llama_gqa"]
    doc = _good(graph)
    change(doc)
    with pytest.raises(InvalidArgument, match=message.replace("[", r"\[")) as err:
        from_mib(doc, graph, model="tiny")
    assert err.value.field == "mib"


def test_size_limits_and_malformed_text() -> None:
    graph = GRAPHS["gpt2"]
    text = export_mib(_circuit(graph, seed=2), graph)
    with pytest.raises(InvalidArgument, match="at most 100 are accepted"):
        parse_mib(text, graph, max_bytes=100, model="tiny")
    with pytest.raises(InvalidArgument, match="not JSON"):
        parse_mib(text[:-1], graph, max_bytes=len(text), model="tiny")
    with pytest.raises(InvalidArgument, match="not JSON"):
        parse_mib(b"\xff\xfe{", graph, max_bytes=100, model="tiny")
    with pytest.raises(InvalidArgument, match="must hold a JSON object"):
        parse_mib("[1, 2]", graph, max_bytes=100, model="tiny")
    too_many = {f"e{i}": {} for i in range(len(mib_edges(graph)) + 1)}  # counted before read
    with pytest.raises(InvalidArgument, match="edges has 76 entries, the model.s graph 75"):
        from_mib({**json.loads(text), "edges": too_many}, graph, model="tiny")


def _only(graph: Graph, edge: str) -> torch.Tensor:
    keep = torch.zeros(graph.n_edges, dtype=torch.bool)  # [E]
    keep[graph.edge_index(edge)] = True
    return keep
