"""Pictures of circuits: drawings of a circuit's graph (DOT, SVG, PNG) and plots.

``scene`` decides what is drawn (importance by the method's score semantics, the top-k and node
filters, the edge or node view); ``layout`` places it without graphviz, ``svg`` and ``raster``
paint that; ``dot`` writes DOT and runs graphviz where it is installed; ``plots`` draws
matplotlib plots. :func:`draw` picks among them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from edgeprune.engine.circuit import Circuit
from edgeprune.engine.contract import MAX_DRAWING_EDGES, MAX_DRAWING_NODES
from edgeprune.engine.drawing.dot import have_graphviz, run_graphviz, scene_to_dot
from edgeprune.engine.drawing.layout import layout as builtin_layout
from edgeprune.engine.drawing.picture import EDGE_STYLES
from edgeprune.engine.drawing.raster import have_rsvg, picture_to_png, svg_to_png
from edgeprune.engine.drawing.scene import Scene, build_scene, graph_of, ranked_edges
from edgeprune.engine.drawing.svg import to_svg
from edgeprune.engine.errors import InvalidArgument, NotSupported
from edgeprune.engine.graph import Graph

LAYOUTS = ("auto", "graphviz", "builtin")
# "auto" hands graphviz at most this many edges: its time grows steeply with them (about 15 s
# at 1,500 edges of a GPT-2 circuit), where the built-in layout stays under a second
AUTO_GRAPHVIZ_EDGES = 600
PLOTS = ("drawing", "per_layer")

@dataclass(frozen=True)
class DrawOptions:
    """What a drawing shows: the ``top_k`` most important edges (None: up to
    ``MAX_DRAWING_EDGES``), only edges touching ``nodes``, one line per edge or per node pair
    (``view``), laid out by graphviz or the built-in layout (``layout``; "auto": graphviz where
    installed), or instead of the drawing a plot (``plot``: "per_layer")."""

    top_k: int | None = None
    nodes: tuple[str, ...] = ()
    view: str = "edges"
    layout: str = "auto"
    plot: str = "drawing"

    def check(self) -> DrawOptions:
        if self.top_k is not None and not (isinstance(self.top_k, int) and not
                                           isinstance(self.top_k, bool)
                                           and 1 <= self.top_k <= MAX_DRAWING_EDGES):
            raise InvalidArgument(f"top_k must be an integer in [1, {MAX_DRAWING_EDGES}], got "
                                  f"{self.top_k!r}", field="top_k")
        if len(self.nodes) > MAX_DRAWING_NODES:
            raise InvalidArgument(f"at most {MAX_DRAWING_NODES} nodes, got {len(self.nodes)}",
                                  field="nodes")
        if self.layout not in LAYOUTS:
            raise InvalidArgument(f"layout must be one of {', '.join(LAYOUTS)}, not "
                                  f"{self.layout!r}", field="layout")
        if self.plot not in PLOTS:
            raise InvalidArgument(f"plot must be one of {', '.join(PLOTS)}, not {self.plot!r}",
                                  field="plot")
        return self

def scene_of(circuit: Circuit, graph: Graph | None, options: DrawOptions) -> Scene:
    options.check()
    top_k = options.top_k
    if top_k is None and len(circuit.edges) > MAX_DRAWING_EDGES:
        top_k = MAX_DRAWING_EDGES  # beyond this no drawing is readable; the title says so
    return build_scene(circuit, graph=graph, top_k=top_k, nodes=options.nodes, view=options.view)

def draw(circuit: Circuit, fmt: str, *, graph: Graph | None = None,
         options: DrawOptions | None = None) -> str | bytes:
    """The circuit drawn as "dot" (str), "svg" (str) or "png" (bytes)."""
    options = (options or DrawOptions()).check()
    if options.plot == "per_layer":
        if fmt not in ("svg", "png"):
            raise InvalidArgument("the per-layer plot is an SVG or PNG", field="format")
        from edgeprune.engine.drawing.plots import per_layer_plot

        data = per_layer_plot(circuit, fmt)
        return data.decode() if fmt == "svg" else data
    scene = scene_of(circuit, graph, options)
    if fmt == "dot":
        return scene_to_dot(scene)
    if fmt not in ("svg", "png"):
        raise InvalidArgument(f"cannot draw a circuit as {fmt!r}", field="format")
    if options.layout == "graphviz" or (options.layout == "auto" and have_graphviz()
                                        and len(scene.edges) <= AUTO_GRAPHVIZ_EDGES):
        try:
            data = run_graphviz(scene_to_dot(scene), fmt)
            return data.decode() if fmt == "svg" else data
        except NotSupported:  # "auto" falls back to the built-in layout
            if options.layout == "graphviz":
                raise
    picture = builtin_layout(scene)
    svg = to_svg(picture)
    if fmt == "svg":
        return svg
    if have_rsvg():
        with contextlib.suppress(NotSupported):  # else matplotlib paints the same picture
            return svg_to_png(svg)
    return picture_to_png(picture)

__all__ = [
    "EDGE_STYLES",
    "LAYOUTS",
    "PLOTS",
    "DrawOptions",
    "build_scene",
    "draw",
    "graph_of",
    "ranked_edges",
    "scene_of",
]
