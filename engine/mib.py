"""Circuits in the JSON format of the MIB benchmark's circuit track (EAP-IG's ``Graph.to_json``).

The file is one JSON object::

    {"cfg": {"n_layers": L, "n_heads": H, "parallel_attn_mlp": false, "d_model": D},
     "nodes": {"input": {"in_graph": true}, "a0.h0": {...}, ..., "m0": {...}, ..., "logits": {...}},
     "edges": {"input->a0.h0<q>": {"score": 0.3, "in_graph": true}, "a0.h0->m0": {...}, ...}}

Its graph is ours with three differences of naming:

* one writer ``input`` stands for the embeddings: our ``tok`` and ``pos`` (models with learned
  positions) both map onto it. An exported ``input`` edge is in the circuit when either of ours is
  (its score the larger in magnitude); an imported one keeps both of ours.
* readers are named after the node they feed, with the input in angle brackets:
  ``a{l}.h{h}<q>`` / ``<k>`` / ``<v>`` (ours ``a{l}.h{h}.q``), ``m{l}``, ``logits``.
* every query head has its own key and value reader (MIB "ungroups" grouped-query attention). Our
  key/value reader of KV head g serves the heads of its group, so an exported edge into it becomes
  one edge into each of those heads, with its score; on import the group's edges merge into ours:
  kept when any of them is in the circuit, with the score of largest magnitude among those kept.

``nodes`` may also be written as ``{name: bool}`` (earlier EAP-IG versions); both are read. A
circuit's nodes follow from its edges here, so node flags are checked for their names only.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from typing import Any

from edgeprune.engine.circuit import Circuit, graph_shape, nodes_of_edges
from edgeprune.engine.errors import InvalidArgument
from edgeprune.engine.export import graph_of
from edgeprune.engine.graph import Graph

INPUT = "input"
IMPORTED = "imported"  # the method of a circuit whose file does not say which one found it


@functools.lru_cache(maxsize=8)
def mib_edges(graph: Graph) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Every MIB edge of ``graph`` in EAP-IG's order, with the indices of our edges it stands for.

    One of ours per MIB edge, except ``input`` edges (``tok`` and ``pos``: two where the model has
    positions). A key/value reader's edge appears under every head of its group.
    """
    group = graph.n_heads // graph.n_kv_heads
    embeddings = graph.writers[: graph.n_embed]

    def ours(parent: str, reader: str) -> tuple[int, ...]:
        r = graph.reader_index(reader)
        writers = embeddings if parent == INPUT else (parent,)
        return tuple(graph.reader_offsets[r] + graph.writer_index(w) for w in writers)

    out: list[tuple[str, tuple[int, ...]]] = []
    stream = [INPUT]  # MIB's writers so far
    for layer in range(graph.n_layers):
        heads = [f"a{layer}.h{h}" for h in range(graph.n_heads)]
        for parent in stream:
            for h, head in enumerate(heads):
                for kind in "qkv":
                    reader = f"{head}.q" if kind == "q" else f"a{layer}.h{h // group}.{kind}"
                    out.append((f"{parent}->{head}<{kind}>", ours(parent, reader)))
        mlp_sees = stream if graph.parallel_attn_mlp else stream + heads
        out += [(f"{parent}->m{layer}", ours(parent, f"m{layer}")) for parent in mlp_sees]
        stream += heads + [f"m{layer}"]
    out += [(f"{parent}->logits", ours(parent, "logits")) for parent in stream]
    return tuple(out)


def mib_nodes(graph: Graph) -> tuple[str, ...]:
    """MIB's node names in EAP-IG's order: ``input``, each layer's heads and MLP, ``logits``."""
    return (INPUT, *graph.writers[graph.n_embed :], "logits")


# ---- export --------------------------------------------------------------------------------------


def to_mib(circuit: Circuit, graph: Graph, *, d_model: int | None = None) -> dict[str, Any]:
    """The circuit as a MIB / EAP-IG graph: every edge of ``graph``, ``in_graph`` for kept ones.

    Scores are the circuit's own (Edge Pruning: log-alpha; EAP, EAP-IG: attribution). Edges
    outside the circuit have none, so they get one below every kept edge's (0 where every kept
    score is positive), and a kept edge without a score the highest: MIB's top-k by score then takes
    the circuit's edges first. ``d_model`` (the model's width) goes into ``cfg``, where EAP-IG's
    loader reads it; without it ``cfg`` has no ``d_model``.
    """
    keep = circuit.edge_mask(graph).bool().tolist()  # checks the circuit belongs to this graph
    scores: dict[int, float] = {}
    for edge, score in circuit.edge_scores.items():
        if isinstance(score, int | float) and math.isfinite(score):
            scores[graph.edge_index(edge)] = float(score)
    kept_scores = [s for i, s in scores.items() if keep[i]]
    lowest, highest = min(kept_scores, default=1.0), max(kept_scores, default=1.0)
    outside = 0.0 if lowest > 0 else lowest - 1.0

    edges: dict[str, dict[str, Any]] = {}
    for name, members in mib_edges(graph):
        kept = [i for i in members if keep[i]]
        if kept:
            score = _largest([scores[i] for i in kept if i in scores], default=highest)
        else:
            score = outside
        edges[name] = {"score": score, "in_graph": bool(kept)}
    in_circuit = set(circuit.nodes)
    nodes = {name: {"in_graph": name == "logits" or name in in_circuit}
             for name in mib_nodes(graph)}
    nodes[INPUT] = {"in_graph": any(w in in_circuit for w in graph.writers[: graph.n_embed])}
    cfg: dict[str, Any] = {"n_layers": graph.n_layers, "n_heads": graph.n_heads,
                           "parallel_attn_mlp": graph.parallel_attn_mlp}
    if d_model is not None:
        cfg["d_model"] = int(d_model)
    return {"cfg": cfg, "nodes": nodes, "edges": edges}


def export_mib(circuit: Circuit, graph: Graph | None = None, *, d_model: int | None = None) -> str:
    """``to_mib`` as strict JSON text (every score is finite).

    ``graph`` defaults to the one the circuit's provenance records, ``d_model`` to its
    ``provenance["d_model"]``.
    """
    graph = graph if graph is not None else graph_of(circuit)
    if graph is None:
        raise InvalidArgument("the circuit records no graph: pass the model's", field="graph")
    if d_model is None and isinstance(circuit.provenance.get("d_model"), int):
        d_model = circuit.provenance["d_model"]
    return json.dumps(to_mib(circuit, graph, d_model=d_model), allow_nan=False)


def _largest(values: list[float], *, default: float) -> float:
    """The value of largest magnitude (the first of equals), or ``default``."""
    return max(values, key=abs) if values else default


# ---- import --------------------------------------------------------------------------------------


def parse_mib(text: str | bytes, graph: Graph, *, max_bytes: int, model: str,
              method: str = IMPORTED) -> Circuit:
    """A circuit from MIB JSON text of at most ``max_bytes`` bytes (see :func:`from_mib`)."""
    if len(text) > max_bytes:
        raise InvalidArgument(f"the file has {len(text):,} bytes, at most {max_bytes:,} are "
                              "accepted", field="mib")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise InvalidArgument(f"not JSON: {err}", field="mib") from None
    return from_mib(obj, graph, model=model, method=method)


def from_mib(obj: Any, graph: Graph, *, model: str, method: str = IMPORTED) -> Circuit:
    """The circuit of the edges a MIB / EAP-IG graph has ``in_graph``, on our ``graph``.

    ``cfg`` must match the graph (layers, query heads, ``parallel_attn_mlp`` where given); every
    node and edge name must be one of the graph's (edges may be left out: they are not in the
    circuit). A non-finite or missing score leaves the edge without one. InvalidArgument (field
    ``mib``) names the first problem.
    """
    if not isinstance(obj, Mapping):
        raise InvalidArgument("the file must hold a JSON object with cfg, nodes and edges",
                              field="mib")
    for key in ("cfg", "edges"):
        if not isinstance(obj.get(key), Mapping):
            raise InvalidArgument(f"{key} must be a JSON object", field="mib")
    _check_cfg(obj["cfg"], graph)
    _check_nodes(obj.get("nodes", {}), graph)

    table = dict(mib_edges(graph))
    entries: Mapping[str, Any] = obj["edges"]
    if len(entries) > len(table):
        raise InvalidArgument(f"edges has {len(entries):,} entries, the model's graph "
                              f"{len(table):,}", field="mib")
    kept: dict[int, list[float]] = {}
    for name, entry in entries.items():
        members = table.get(name)
        if members is None:
            raise InvalidArgument(f"edges: unknown edge {name!r} (names look like "
                                  "'input->a0.h1<q>', 'a0.h1->m0', 'm1->logits')", field="mib")
        if not isinstance(entry, Mapping) or not isinstance(entry.get("in_graph"), bool):
            raise InvalidArgument(f"edges[{name!r}] must be an object with a boolean in_graph",
                                  field="mib")
        score = entry.get("score")
        if score is not None and (isinstance(score, bool) or not isinstance(score, int | float)):
            raise InvalidArgument(f"edges[{name!r}].score must be a number or null", field="mib")
        if entry["in_graph"]:
            for i in members:
                values = kept.setdefault(i, [])
                if score is not None and math.isfinite(score):
                    values.append(float(score))
    if not kept:
        raise InvalidArgument("no edge has in_graph true: the file holds scores without a "
                              "circuit (cut one first, e.g. with EAP-IG's apply_topn)", field="mib")
    order = sorted(kept)  # graph order
    edges = [graph.edges[i] for i in order]
    return Circuit(
        model=model,
        method=method,
        edges=edges,
        edge_scores={graph.edges[i]: _largest(kept[i], default=0.0) for i in order if kept[i]},
        nodes=nodes_of_edges(edges, graph),
        total_edge_count=graph.n_edges,
        target={"edge_count": len(edges)},
        provenance={"graph": graph_shape(graph), "source": "mib"},
    )


def _check_cfg(cfg: Mapping[str, Any], graph: Graph) -> None:
    for key, ours in (("n_layers", graph.n_layers), ("n_heads", graph.n_heads)):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgument(f"cfg.{key} must be an integer, got {value!r}", field="mib")
        if value != ours:
            raise InvalidArgument(f"cfg.{key} is {value}; the model has {ours}", field="mib")
    parallel = cfg.get("parallel_attn_mlp", graph.parallel_attn_mlp)
    if parallel is not None and bool(parallel) != graph.parallel_attn_mlp:
        raise InvalidArgument(f"cfg.parallel_attn_mlp is {parallel}; the model's is "
                              f"{graph.parallel_attn_mlp}", field="mib")


def _check_nodes(nodes: Any, graph: Graph) -> None:
    if not isinstance(nodes, Mapping):
        raise InvalidArgument("nodes must be a JSON object", field="mib")
    known = set(mib_nodes(graph))
    if len(nodes) > len(known):
        raise InvalidArgument(f"nodes has {len(nodes):,} entries, the model's graph "
                              f"{len(known):,}", field="mib")
    for name, value in nodes.items():
        if name not in known:
            raise InvalidArgument(f"nodes: unknown node {name!r} (names look like 'input', "
                                  "'a0.h1', 'm0', 'logits')", field="mib")
        flag = value.get("in_graph") if isinstance(value, Mapping) else value
        if not isinstance(flag, bool):
            raise InvalidArgument(f"nodes[{name!r}] must be a boolean or an object with a "
                                  "boolean in_graph", field="mib")


__all__ = ["IMPORTED", "export_mib", "from_mib", "mib_edges", "mib_nodes", "parse_mib",
           "to_mib"]
