"""ImportCircuit and the MIB export over a real server: an imported circuit is read, exported,
compared and evaluated like a job's; bad files fail with INVALID_ARGUMENT on mib_json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edgeprune.engine.circuit import circuit_from_keep
from edgeprune.engine.graph import Graph
from edgeprune.engine.mib import to_mib
from edgeprune.v1 import circuit_pb2, common_pb2, job_pb2
from tests.service.errors import fails
from tests.service.harness import MODEL, Server, inline_examples
from tests.service.test_bad_input import invalid
from tests.service.test_jobs import export


def tiny_graph(model_dir: Path) -> tuple[Graph, int]:
    """The tiny GPT-2's graph and width, from its config as the server reads it."""
    config = json.loads((model_dir / "config.json").read_text())
    return Graph.build(config["n_layer"], config["n_head"], config["n_head"], True), config["n_embd"]


def mib_file(graph: Graph, edges: list[str], score: float = 1.5) -> dict:
    keep = torch.zeros(graph.n_edges, dtype=torch.bool)  # [E]
    keep[[graph.edge_index(e) for e in edges]] = True
    circuit = circuit_from_keep(graph, keep, torch.full((graph.n_edges,), score), model=MODEL,
                                method="eap_ig", target={})
    return to_mib(circuit, graph, d_model=8)


def import_request(doc: dict, **fields: object) -> circuit_pb2.ImportCircuitRequest:
    return circuit_pb2.ImportCircuitRequest(model=MODEL, mib_json=json.dumps(doc).encode(),
                                            **fields)


EDGES = ["tok->a0.h0.q", "pos->a0.h0.q", "a0.h0->m0", "m0->logits", "a0.h1->logits"]


def test_an_imported_circuit_is_exported_compared_and_evaluated(
        live_server: Server, backend: str, tiny_gpt2_dir: Path) -> None:
    graph, d_model = tiny_graph(tiny_gpt2_dir)
    doc = mib_file(graph, EDGES)
    imported = live_server.circuits.ImportCircuit(
        import_request(doc, method=common_pb2.METHOD_EAP_IG, task="ioi", request_id="imp-1"),
        timeout=60)
    assert (imported.method, imported.task, imported.job) == (common_pb2.METHOD_EAP_IG, "ioi", "")
    assert imported.edge_count == len(EDGES) and imported.total_edge_count == graph.n_edges
    full = live_server.circuits.GetCircuit(circuit_pb2.GetCircuitRequest(
        name=imported.name, view=common_pb2.VIEW_FULL))
    assert sorted(e.name for e in full.edges) == sorted(EDGES)
    assert {e.score for e in full.edges} == {1.5}
    assert set(full.nodes) == {"tok", "pos", "a0.h0", "a0.h1", "m0", "logits"}

    # a retry returns the first import; the same key with another file is refused
    again = live_server.circuits.ImportCircuit(import_request(
        doc, method=common_pb2.METHOD_EAP_IG, task="ioi", request_id="imp-1"), timeout=60)
    assert again.name == imported.name
    other = mib_file(graph, EDGES[2:])
    assert fails(live_server.circuits.ImportCircuit, import_request(other, request_id="imp-1"),
                 timeout=60)[0] == "ALREADY_EXISTS"

    kind, filename, body = export(live_server, imported.name, circuit_pb2.EXPORT_FORMAT_MIB)
    assert kind == "application/json" and filename.endswith(".mib.json")
    exported = json.loads(body)
    assert exported["cfg"] == {"n_layers": graph.n_layers, "n_heads": graph.n_heads,
                               "parallel_attn_mlp": False, "d_model": d_model}
    assert exported["edges"] == doc["edges"]  # the file round-trips through the server

    smaller = live_server.circuits.ImportCircuit(import_request(other), timeout=60)
    assert smaller.method == common_pb2.METHOD_UNSPECIFIED and smaller.edge_count == 3
    compared = live_server.circuits.CompareCircuits(circuit_pb2.CompareCircuitsRequest(
        first=imported.name, second=smaller.name))
    assert sorted(compared.shared_edges) == sorted(EDGES[2:])
    assert compared.edge_jaccard == pytest.approx(3 / 5)

    if backend != "sqlite":
        return  # the evaluation reads the circuit as any other: once is enough (and slow)
    evaluation = live_server.circuits.EvaluateCircuit(circuit_pb2.EvaluateCircuitRequest(
        evaluation=job_pb2.EvaluationSpec(circuit=imported.name, data=inline_examples(8))),
        timeout=60)
    done = live_server.wait_done(evaluation.name)
    assert done.state == job_pb2.JOB_STATE_SUCCEEDED, done.error
    assert list(done.result.circuits) == [imported.name] and "kl" in done.result.metrics


def test_bad_imports_name_the_field(api_server: Server, tiny_gpt2_dir: Path) -> None:
    graph, _ = tiny_graph(tiny_gpt2_dir)
    good = mib_file(graph, EDGES)
    call = api_server.circuits.ImportCircuit
    invalid(api_server, call, circuit_pb2.ImportCircuitRequest(
        model="nope", mib_json=json.dumps(good).encode()), "model")
    invalid(api_server, call, circuit_pb2.ImportCircuitRequest(model=MODEL), "mib_json")
    invalid(api_server, call, circuit_pb2.ImportCircuitRequest(
        model=MODEL, mib_json=b'{"cfg": {'), "mib_json")
    wrong_cfg = {**good, "cfg": {**good["cfg"], "n_layers": graph.n_layers + 1}}
    invalid(api_server, call, import_request(wrong_cfg), "mib_json")
    unknown = {**good, "edges": {"a0.h0->a0.h9<q>": {"score": 1.0, "in_graph": True}}}
    invalid(api_server, call, import_request(unknown), "mib_json")
    invalid(api_server, call, import_request(good, method=99), "method")
    invalid(api_server, call, import_request(good, task="t" * 65), "task")
    invalid(api_server, call, import_request(good, request_id="r" * 256), "request_id")
