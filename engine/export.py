"""A circuit as JSON, or drawn (Graphviz DOT, SVG, PNG; see ``engine/drawing``).

The drawings are laid out by graphviz's ``dot`` where it is installed, else by the built-in
layered layout; ``options`` (:class:`DrawOptions`) filter them (top k edges, edges touching given
nodes), switch to a node-level view, or ask for the per-layer plot instead.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from edgeprune.engine.circuit import Circuit
from edgeprune.engine.drawing import EDGE_STYLES, DrawOptions, draw, graph_of
from edgeprune.engine.errors import InvalidArgument
from edgeprune.engine.graph import Graph

FORMATS = ("json", "dot", "svg", "png", "mib")
DRAWINGS = ("dot", "svg", "png")


def export_circuit(
    circuit: Circuit | Mapping[str, Any], fmt: str, *, graph: Graph | None = None,
    options: DrawOptions | None = None,
) -> str | bytes:
    """The circuit in ``fmt``: "json", "dot" or "svg" (str), "png" (bytes), "mib" (str: MIB's
    circuit format, see ``edgeprune.engine.mib``)."""
    if fmt == "mib":
        from edgeprune.engine.mib import export_mib  # imports this module

        return export_mib(_as_circuit(circuit), graph=graph)
    if fmt == "json":
        return circuit_to_json(circuit)
    if fmt in DRAWINGS:
        return draw(_as_circuit(circuit), fmt, graph=graph, options=options)
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


# ---- drawings ------------------------------------------------------------------------------------


def circuit_to_dot(circuit: Circuit | Mapping[str, Any], *, graph: Graph | None = None,
                   options: DrawOptions | None = None) -> str:
    """Graphviz DOT source (``dot -Tsvg``) with one rank per row and a legend cluster."""
    return str(draw(_as_circuit(circuit), "dot", graph=graph, options=options))


def circuit_to_svg(circuit: Circuit | Mapping[str, Any], *, graph: Graph | None = None,
                   options: DrawOptions | None = None) -> str:
    """A self-contained SVG drawing; every node and edge has a hover title. Without
    ``options`` it is the built-in layout's, the same with or without graphviz."""
    options = options or DrawOptions(layout="builtin")
    return str(draw(_as_circuit(circuit), "svg", graph=graph, options=options))


__all__ = [
    "DRAWINGS",
    "EDGE_STYLES",
    "FORMATS",
    "DrawOptions",
    "circuit_to_dot",
    "circuit_to_json",
    "circuit_to_svg",
    "export_circuit",
    "graph_of",
]
