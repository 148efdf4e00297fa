"""What a circuit drawing shows: its nodes and edges, each edge's importance, and the filters.

Importance follows the circuit's own score semantics. Edge Pruning stores each edge's log-alpha,
so the importance is the hard-concrete keep probability P(z > 0) in [0, 1]: a firmly-off edge is
near 0 even though its |log-alpha| is large. Attribution methods store |attribution| (or, for
circuits made elsewhere, a signed score): the importance is |score| over the largest |score|,
and a negative score is drawn in its own colour. The same ordering ranks the "top edges".

In a grouped-query model a key/value reader feeds its whole KV group; given the model's graph
(or a circuit whose provenance records it, :func:`graph_of`) such an edge targets the group
(drawn as a box around the group's heads); otherwise the reader's head index is taken as the
head, which is right for every model without grouped-query attention.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from edgeprune.engine import masks
from edgeprune.engine.circuit import Circuit
from edgeprune.engine.errors import InvalidArgument
from edgeprune.engine.graph import Graph

_HEAD = re.compile(r"^a(\d+)\.h(\d+)$")
_MLP = re.compile(r"^m(\d+)$")
_HEAD_READER = re.compile(r"^(a\d+\.h\d+)\.([qkv])$")
LOGITS_ROW = 1 << 30
VIEWS = ("edges", "nodes")
# log_alpha at which P(z > 0) == 1/2 (see engine/masks.py)
_SHIFT = masks.BETA * math.log(-masks.LEFT / masks.RIGHT)


@dataclass(frozen=True)
class Node:
    name: str
    kind: str  # embed | head | mlp | logits
    row: int  # 0 embeddings, 1 + 2l heads of layer l, 2 + 2l MLP of layer l, LOGITS_ROW
    order: int  # head index within its row (0 for the others)
    group: int  # KV group of a head (== order without grouped-query attention)


@dataclass(frozen=True)
class Edge:
    """One drawn line: a kept edge, or (node view) every kept edge between two nodes."""

    name: str
    source: str
    target: str  # a node; for a key/value edge of a KV group, the group's first head
    kind: str  # q | k | v | mlp | logits
    score: float | None
    importance: float  # in [0, 1], see the module doc
    negative: bool = False
    count: int = 1  # kept edges this line stands for (node view)
    group_heads: tuple[str, ...] = ()  # k/v edges of a KV group: every head of the group


@dataclass
class Scene:
    title: str
    method: str
    nodes: dict[str, Node]
    edges: list[Edge]  # most important first
    rows: list[int]  # rows that hold a node, top to bottom
    view: str = "edges"
    signed: bool = False  # some score is negative: colour by sign
    group_size: int = 1  # heads per KV group
    degree: dict[str, int] = field(default_factory=dict)  # kept edges in + out per node
    note: str = ""  # what the filters left out


def graph_of(circuit: Circuit) -> Graph | None:
    """The graph recorded in ``circuit.provenance["graph"]`` ({n_layers, n_heads, n_kv_heads,
    has_pos, parallel_attn_mlp (absent: False, as circuits recorded before it)}), or None where
    the circuit does not record one."""
    shape = circuit.provenance.get("graph")
    if not isinstance(shape, dict):
        return None
    try:
        return Graph.build(int(shape["n_layers"]), int(shape["n_heads"]),
                           int(shape["n_kv_heads"]), bool(shape["has_pos"]),
                           bool(shape.get("parallel_attn_mlp", False)))
    except (KeyError, TypeError, ValueError, InvalidArgument):
        return None


def as_circuit(circuit: Circuit | dict) -> Circuit:
    return circuit if isinstance(circuit, Circuit) else Circuit.from_dict(dict(circuit))


def node(name: str, group_size: int = 1) -> Node:
    """The drawn node ``name``; InvalidArgument (field ``circuit.nodes``) for a name that is none."""
    if name in ("tok", "pos"):
        return Node(name, "embed", 0, 0 if name == "tok" else 1, 0)
    if name == "logits":
        return Node(name, "logits", LOGITS_ROW, 0, 0)
    head = _HEAD.match(name)
    if head:
        h = int(head[2])
        return Node(name, "head", 1 + 2 * int(head[1]), h, h // group_size)
    mlp = _MLP.match(name)
    if mlp:
        return Node(name, "mlp", 2 + 2 * int(mlp[1]), 0, 0)
    raise InvalidArgument(f"unknown node {name!r} in the circuit", field="circuit.nodes")


def importance_of(method: str, scores: Iterable[float | None]) -> list[float]:
    """Each score's importance in [0, 1] (see the module doc); 1 for an edge without a score."""
    values = list(scores)
    if method == "edge_pruning":
        return [1.0 if s is None or math.isnan(s) else _keep_probability(s) for s in values]
    top = max((abs(s) for s in values if s is not None and math.isfinite(s)), default=0.0)
    return [1.0 if s is None or not math.isfinite(s) or top <= 0 else abs(s) / top
            for s in values]


def _keep_probability(log_alpha: float) -> float:
    x = log_alpha - _SHIFT
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def ranked_edges(circuit: Circuit) -> list[tuple[str, float]]:
    """(edge, importance), most important first (ties in the circuit's order): the "top edges"."""
    weights = importance_of(circuit.method, (circuit.edge_scores.get(e) for e in circuit.edges))
    order = sorted(range(len(weights)), key=lambda i: -weights[i])
    return [(circuit.edges[i], weights[i]) for i in order]


def build_scene(circuit: Circuit, *, graph: Graph | None = None, top_k: int | None = None,
                nodes: Sequence[str] = (), view: str = "edges") -> Scene:
    """The scene of ``circuit``: the edges touching ``nodes`` (all when empty), the ``top_k``
    most important of those (all when None), one line per edge or per node pair (``view``)."""
    if view not in VIEWS:
        raise InvalidArgument(f"view must be one of {', '.join(VIEWS)}, not {view!r}", field="view")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise InvalidArgument(f"top_k must be a positive integer, got {top_k!r}", field="top_k")
    graph = graph if graph is not None else graph_of(circuit)
    group_size = graph.n_heads // graph.n_kv_heads if graph is not None else 1
    wanted = {name: node(_check_filter_node(name), group_size) for name in nodes}
    edges = [_edge(circuit, name, graph, weight)
             for name, weight in ranked_edges(circuit)]
    n_kept = len(edges)
    if wanted:
        edges = [e for e in edges if e.source in wanted or e.target in wanted
                 or any(h in wanted for h in e.group_heads)]
    if top_k is not None:
        edges = edges[:top_k]
    notes = []
    if wanted:
        notes.append("touching " + ", ".join(wanted))
    if len(edges) < n_kept:
        notes.append(f"{len(edges)} most important of {n_kept} edges")
    names = dict.fromkeys(n for n in circuit.nodes if not edges and not wanted and
                          (n != "logits" or circuit.edges))
    for e in edges:
        names.update(dict.fromkeys((e.source, e.target, *e.group_heads)))
    drawn = {name: node(name, group_size) for name in names}
    for e in edges:
        if drawn[e.source].row >= drawn[e.target].row:
            raise InvalidArgument(f"edge {e.name!r} does not go downstream", field="circuit.edges")
    degree = dict.fromkeys(drawn, 0)
    for e in edges:
        degree[e.source] += 1
        degree[e.target] += 1
    if view == "nodes":
        edges = _aggregate(edges)
    return Scene(title=_title(circuit), method=circuit.method, nodes=drawn, edges=edges,
                 rows=sorted({n.row for n in drawn.values()}), view=view,
                 signed=any(e.negative for e in edges), group_size=group_size, degree=degree,
                 note="; ".join(notes))


def _check_filter_node(name: str) -> str:
    if not isinstance(name, str) or not (name in ("tok", "pos", "logits") or _HEAD.match(name)
                                         or _MLP.match(name)):
        raise InvalidArgument(f"unknown node {name!r}: use tok, pos, a{{layer}}.h{{head}}, "
                              "m{layer} or logits", field="nodes")
    return name


def _edge(circuit: Circuit, name: str, graph: Graph | None, weight: float) -> Edge:
    source, sep, reader = name.partition("->")
    if not sep:
        raise InvalidArgument(f"bad edge name {name!r}", field="circuit.edges")
    head = _HEAD_READER.match(reader)
    group: tuple[str, ...] = ()
    if head:
        kind = head[2]
        if graph is not None:
            try:
                target = graph.reader_node(reader)
                group = graph.reader_heads(reader) if kind != "q" else ()
            except InvalidArgument as err:
                raise InvalidArgument(f"edge {name!r} is not in the model's graph",
                                      field="circuit.edges") from err
        else:
            target = head[1]
    else:
        target, kind = reader, ("logits" if reader == "logits" else "mlp")
    score = circuit.edge_scores.get(name)
    return Edge(name, source, target, kind, score, weight,
                negative=score is not None and score < 0,
                group_heads=group if len(group) > 1 else ())


def _aggregate(edges: list[Edge]) -> list[Edge]:
    """One line per (source, target) node pair: importance the pair's share of the largest count."""
    pairs: dict[tuple[str, str], list[Edge]] = {}
    for e in edges:
        pairs.setdefault((e.source, e.target), []).append(e)
    top = max((len(v) for v in pairs.values()), default=1)
    out = []
    for (source, target), members in pairs.items():
        kinds = [e.kind for e in members]
        kind = max(dict.fromkeys(kinds), key=kinds.count)  # the most common input
        out.append(Edge(f"{source}->{target}", source, target, kind, None,
                        len(members) / top, count=len(members),
                        group_heads=members[0].group_heads if kind in "kv" else ()))
    return sorted(out, key=lambda e: -e.count)


def _title(circuit: Circuit) -> str:
    parts = [circuit.model or "model", circuit.method or "circuit",
             f"{len(circuit.edges)}/{circuit.total_edge_count} edges"]
    for key in ("faithfulness", "kl", "accuracy"):
        value = circuit.metrics.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            parts.append(f"{key} {value:.3g}")
    return " · ".join(parts)


def row_label(row: int) -> str:
    if row == 0:
        return "embed"
    if row == LOGITS_ROW:
        return "logits"
    return f"L{(row - 1) // 2} {'attn' if row % 2 else 'mlp'}"
