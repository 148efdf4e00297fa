"""A circuit as JSON, as Graphviz DOT, or as an SVG drawn here in pure Python (no graphviz needed).

Both drawings share one layout: rows from top to bottom are the embeddings (``tok``, ``pos``), then
for every layer its attention heads and its MLP, and ``logits`` at the bottom; layers the circuit
does not touch are left out. Heads and MLPs are nodes; an edge into a head is coloured and dashed
by the input it feeds (query solid blue, key dashed green, value dotted red) and enters the head at
its own port, with a legend. Edge width grows with the edge's score where the circuit has scores.

In a grouped-query model a key/value reader feeds a whole KV group; given the model's ``graph``
(or a circuit whose provenance records it, see :func:`graph_of`) its edges are drawn into the
group's first head (``Graph.reader_node``); otherwise the reader's head index is taken as the head,
which is right for every model without grouped-query attention.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape

from edgeprune.engine.circuit import Circuit
from edgeprune.engine.errors import InvalidArgument
from edgeprune.engine.graph import Graph

FORMATS = ("json", "dot", "svg", "mib")
_HEAD = re.compile(r"^a(\d+)\.h(\d+)$")
_MLP = re.compile(r"^m(\d+)$")
_HEAD_READER = re.compile(r"^(a\d+\.h\d+)\.([qkv])$")

# input kind -> (label, colour, SVG dash pattern, DOT style)
EDGE_STYLES: dict[str, tuple[str, str, str, str]] = {
    "q": ("query", "#1f77b4", "", "solid"),
    "k": ("key", "#2ca02c", "6 3", "dashed"),
    "v": ("value", "#d62728", "2 3", "dotted"),
    "mlp": ("MLP input", "#7f7f7f", "", "solid"),
    "logits": ("logits", "#9467bd", "", "solid"),
}
NODE_FILL = {"embed": "#eeeeee", "head": "#dbe9f6", "mlp": "#fde5c8", "logits": "#d9f0d3"}


def export_circuit(
    circuit: Circuit | Mapping[str, Any], fmt: str, *, graph: Graph | None = None
) -> str:
    """The circuit in ``fmt`` ("json", "dot" or "svg"; "mib": MIB's circuit format, see
    ``edgeprune.engine.mib``)."""
    if fmt == "mib":
        from edgeprune.engine.mib import export_mib  # imports this module

        return export_mib(_as_circuit(circuit), graph=graph)
    if fmt == "json":
        return circuit_to_json(circuit)
    if fmt == "dot":
        return circuit_to_dot(circuit, graph=graph)
    if fmt == "svg":
        return circuit_to_svg(circuit, graph=graph)
    raise InvalidArgument(f"unknown export format {fmt!r}; use one of {FORMATS}", field="format")


def _as_circuit(circuit: Circuit | Mapping[str, Any]) -> Circuit:
    if isinstance(circuit, Circuit):
        return circuit
    return Circuit.from_dict(dict(circuit))


# ---- JSON ----------------------------------------------------------------------------------------


def circuit_to_json(circuit: Circuit | Mapping[str, Any], *, indent: int | None = 2) -> str:
    """Nodes, edges, scores, metrics, settings and provenance as strict JSON (NaN, inf: null)."""
    return json.dumps(_finite(_as_circuit(circuit).to_dict()), indent=indent, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


# ---- layout --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Node:
    name: str
    kind: str  # embed | head | mlp | logits
    row: int  # 0 embeddings, 1 + 2l heads of layer l, 2 + 2l MLP of layer l, big for logits
    order: int  # position within the row


@dataclass(frozen=True)
class _Edge:
    name: str
    source: str
    target: str
    kind: str  # q | k | v | mlp | logits
    score: float | None


@dataclass(frozen=True)
class _Layout:
    nodes: dict[str, _Node]
    edges: list[_Edge]
    rows: list[int]  # the rows that hold a node, top to bottom


def _node(name: str) -> _Node:
    if name in ("tok", "pos"):
        return _Node(name, "embed", 0, 0 if name == "tok" else 1)
    if name == "logits":
        return _Node(name, "logits", 1 << 30, 0)
    head = _HEAD.match(name)
    if head:
        return _Node(name, "head", 1 + 2 * int(head[1]), int(head[2]))
    mlp = _MLP.match(name)
    if mlp:
        return _Node(name, "mlp", 2 + 2 * int(mlp[1]), 0)
    raise InvalidArgument(f"unknown node {name!r} in the circuit", field="circuit.nodes")


def graph_of(circuit: Circuit) -> Graph | None:
    """The graph recorded in ``circuit.provenance["graph"]`` ({n_layers, n_heads, n_kv_heads,
    has_pos}), or None where the circuit does not record one."""
    shape = circuit.provenance.get("graph")
    if not isinstance(shape, dict):
        return None
    try:
        return Graph.build(
            int(shape["n_layers"]),
            int(shape["n_heads"]),
            int(shape["n_kv_heads"]),
            bool(shape["has_pos"]),
        )
    except (KeyError, TypeError, ValueError):
        return None


def _layout(circuit: Circuit, graph: Graph | None) -> _Layout:
    graph = graph if graph is not None else graph_of(circuit)
    edges: list[_Edge] = []
    for name in circuit.edges:
        source, sep, reader = name.partition("->")
        if not sep:
            raise InvalidArgument(f"bad edge name {name!r}", field="circuit.edges")
        head = _HEAD_READER.match(reader)
        if head:
            target = graph.reader_node(reader) if graph is not None else head[1]
            kind = head[2]
        else:
            target, kind = reader, ("logits" if reader == "logits" else "mlp")
        edges.append(_Edge(name, source, target, kind, circuit.edge_scores.get(name)))
    names = dict.fromkeys(n for n in circuit.nodes if n != "logits" or edges)
    for edge in edges:
        names.update(dict.fromkeys((edge.source, edge.target)))
    nodes = {name: _node(name) for name in names}
    for edge in edges:
        if nodes[edge.source].row >= nodes[edge.target].row:
            raise InvalidArgument(
                f"edge {edge.name!r} does not go downstream", field="circuit.edges"
            )
    return _Layout(nodes, edges, sorted({n.row for n in nodes.values()}))


def _row_label(row: int) -> str:
    if row == 0:
        return "embed"
    if row == 1 << 30:
        return "logits"
    return f"L{(row - 1) // 2} {'attn' if row % 2 else 'mlp'}"


def _title(circuit: Circuit) -> str:
    parts = [
        circuit.model or "model",
        circuit.method or "circuit",
        f"{len(circuit.edges)}/{circuit.total_edge_count} edges",
    ]
    for key in ("faithfulness", "kl", "accuracy"):
        value = circuit.metrics.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            parts.append(f"{key} {value:.3g}")
    return " · ".join(parts)


# ---- DOT -----------------------------------------------------------------------------------------


def circuit_to_dot(circuit: Circuit | Mapping[str, Any], *, graph: Graph | None = None) -> str:
    """Graphviz DOT source (``dot -Tsvg``) with one rank per row and a legend cluster."""
    c = _as_circuit(circuit)
    layout = _layout(c, graph)
    out = [
        "digraph circuit {",
        f"  label={_dot_str(_title(c))}; labelloc=t; rankdir=TB; nodesep=0.15; ranksep=0.6;",
        '  node [fontname="Helvetica", fontsize=10, style=filled, height=0.3];',
        "  edge [arrowsize=0.5];",
    ]
    shapes = {"embed": "ellipse", "head": "box", "mlp": "box", "logits": "octagon"}
    for row in layout.rows:
        members = sorted((n for n in layout.nodes.values() if n.row == row), key=lambda n: n.order)
        out.append(f"  {{ rank=same; // {_row_label(row)}")
        for n in members:
            out.append(
                f"    {_dot_str(n.name)} [shape={shapes[n.kind]}, "
                f"fillcolor={_dot_str(NODE_FILL[n.kind])}];"
            )
        out.append("  }")
    top = _max_score(layout.edges)
    for e in layout.edges:
        _, colour, _, style = EDGE_STYLES[e.kind]
        width = _width(e.score, top)
        tip = e.name if e.score is None else f"{e.name} ({e.score:.4g})"
        out.append(
            f"  {_dot_str(e.source)} -> {_dot_str(e.target)} [color={_dot_str(colour)}, "
            f"style={style}, penwidth={width:.2f}, tooltip={_dot_str(tip)}];"
        )
    out.append('  subgraph cluster_legend { label="inputs"; fontsize=10; color="#bbbbbb";')
    for i, (kind, (label, colour, _, style)) in enumerate(EDGE_STYLES.items()):
        out.append(
            f'    legend_{i}a [label="", shape=point, width=0.05]; '
            f'legend_{i}b [label={_dot_str(label)}, shape=plaintext, style=""];'
        )
        out.append(
            f"    legend_{i}a -> legend_{i}b [color={_dot_str(colour)}, style={style}]; // {kind}"
        )
    out.append("  }")
    out.append("}")
    return "\n".join(out) + "\n"


def _dot_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _max_score(edges: list[_Edge]) -> float:
    return max((_strength(e) for e in edges), default=0.0)


def _strength(edge: _Edge) -> float:
    """|score|, 0 without one (for drawing order)."""
    return abs(edge.score) if edge.score is not None and math.isfinite(edge.score) else 0.0


def _width(score: float | None, top: float) -> float:
    """Stroke width 0.6 .. 3.0 by |score| / max |score| (1.2 without scores)."""
    if score is None or not math.isfinite(score) or top <= 0:
        return 1.2
    return 0.6 + 2.4 * abs(score) / top


# ---- SVG -----------------------------------------------------------------------------------------

_NODE_W, _NODE_H = 64, 24
_GAP_X, _ROW_H = 14, 64
_LEFT, _TOP = 80, 92  # room for row labels and for the title and legend
_ROUND = {"embed": 12, "logits": 12}  # corner radius: embeddings and logits are rounded
_PORT = {"q": -18, "k": 0, "v": 18}  # x offset of each head input on the node's top edge


def circuit_to_svg(circuit: Circuit | Mapping[str, Any], *, graph: Graph | None = None) -> str:
    """A self-contained SVG drawing (see the module doc); every node and edge has a hover title."""
    c = _as_circuit(circuit)
    layout = _layout(c, graph)
    widest = max(
        (sum(1 for n in layout.nodes.values() if n.row == r) for r in layout.rows), default=1
    )
    inner = max(widest * (_NODE_W + _GAP_X), 5 * 110)
    width = _LEFT + inner + 20
    height = _TOP + len(layout.rows) * _ROW_H + 10
    place = _positions(layout, inner)
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif" '
            'font-size="10">'
        ),
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>',
        f'<text x="10" y="20" font-size="13" font-weight="bold">{escape(_title(c))}</text>',
    ]
    out += _legend(10, 38)
    for i, row in enumerate(layout.rows):
        y = _TOP + i * _ROW_H + _NODE_H / 2 + 4
        out.append(f'<text x="10" y="{y:.1f}" fill="#666666">{escape(_row_label(row))}</text>')
    top = _max_score(layout.edges)
    out.append('<g fill="none" stroke-opacity="0.6">')
    for e in sorted(layout.edges, key=_strength):  # the strongest edges are drawn on top
        label, colour, dash, _ = EDGE_STYLES[e.kind]
        (x1, y1), (x2, y2) = place[e.source], place[e.target]
        x2 += _PORT.get(e.kind, 0)
        y1 += _NODE_H
        bend = max((y2 - y1) * 0.5, 20.0)
        tip = f"{e.name} ({label})" + ("" if e.score is None else f" score {e.score:.4g}")
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(
            f'<path d="M{x1:.1f},{y1:.1f} C{x1:.1f},{y1 + bend:.1f} {x2:.1f},{y2 - bend:.1f} '
            f'{x2:.1f},{y2:.1f}" stroke="{colour}" stroke-width="{_width(e.score, top):.2f}"'
            f"{dash_attr}><title>{escape(tip)}</title></path>"
        )
    out.append("</g>")
    for name, node in layout.nodes.items():
        x, y = place[name]
        out.append(
            f'<g><title>{escape(name)}</title><rect x="{x - _NODE_W / 2:.1f}" y="{y:.1f}" '
            f'width="{_NODE_W}" height="{_NODE_H}" rx="{_ROUND.get(node.kind, 3)}" '
            f'fill="{NODE_FILL[node.kind]}" stroke="#444444"/>'
            f'<text x="{x:.1f}" y="{y + _NODE_H / 2 + 3.5:.1f}" text-anchor="middle">'
            f"{escape(name)}</text>"
            "</g>"
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _positions(layout: _Layout, inner: float) -> dict[str, tuple[float, float]]:
    """Top-centre point of every node: rows top to bottom, each row centred."""
    place: dict[str, tuple[float, float]] = {}
    for i, row in enumerate(layout.rows):
        members = sorted((n for n in layout.nodes.values() if n.row == row), key=lambda n: n.order)
        span = len(members) * (_NODE_W + _GAP_X) - _GAP_X
        x0 = _LEFT + (inner - span) / 2 + _NODE_W / 2
        for j, n in enumerate(members):
            place[n.name] = (x0 + j * (_NODE_W + _GAP_X), float(_TOP + i * _ROW_H))
    return place


def _legend(x: float, y: float) -> list[str]:
    out = []
    for i, (label, colour, dash, _) in enumerate(EDGE_STYLES.values()):
        left = x + i * 110
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(
            f'<line x1="{left}" y1="{y}" x2="{left + 28}" y2="{y}" stroke="{colour}" '
            f'stroke-width="2"{dash_attr}/>'
        )
        out.append(f'<text x="{left + 34}" y="{y + 3.5}">{escape(label)}</text>')
    return out


__all__ = [
    "EDGE_STYLES",
    "FORMATS",
    "circuit_to_dot",
    "circuit_to_json",
    "circuit_to_svg",
    "export_circuit",
    "graph_of",
]
