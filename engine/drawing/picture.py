"""A laid-out drawing as plain shapes (boxes, lines of Bézier and straight segments, labels), and
the styles every backend shares: the built-in layout makes a Picture, svg.py and raster.py paint it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# input kind -> (label, colour, SVG dash pattern, DOT style)
EDGE_STYLES: dict[str, tuple[str, str, str, str]] = {
    "q": ("query", "#1f77b4", "", "solid"),
    "k": ("key", "#2ca02c", "6 3", "dashed"),
    "v": ("value", "#d62728", "2 3", "dotted"),
    "mlp": ("MLP input", "#7f7f7f", "", "solid"),
    "logits": ("logits", "#9467bd", "", "solid"),
}
# a circuit with negative scores is coloured by sign; the input kind keeps its dash pattern
SIGN_COLOURS = {"positive": "#1f5fa8", "negative": "#e0661b"}
SIGNED_KIND_COLOUR = "#555555"  # the legend's kind samples in signed mode
NODE_FILL = {"embed": "#eeeeee", "head": "#dbe9f6", "mlp": "#fde5c8", "logits": "#d9f0d3"}
GROUP_STROKE = "#8fa8c8"


def edge_colour(kind: str, negative: bool, signed: bool) -> str:
    if signed:
        return SIGN_COLOURS["negative" if negative else "positive"]
    return EDGE_STYLES[kind][1]


def edge_width(importance: float, view: str) -> float:
    """Stroke width: a firmly-off edge (importance ~0) is a hairline."""
    return (0.6 + 5.0 * importance) if view == "nodes" else (0.35 + 2.65 * importance)


def edge_opacity(importance: float) -> float:
    return 0.25 + 0.6 * importance


Point = tuple[float, float]


@dataclass
class Box:
    x: float  # left
    y: float  # top
    w: float
    h: float
    fill: str
    stroke: str
    title: str
    label: str = ""
    rx: float = 3.0
    role: str = "node"  # node | group
    dash: str = ""


@dataclass
class Line:
    """A path: ``start`` then segments ("C", c1, c2, end) or ("L", end)."""

    start: Point
    segments: list[tuple]
    stroke: str
    width: float
    opacity: float
    dash: str
    title: str


@dataclass
class Label:
    x: float
    y: float  # baseline
    text: str
    size: float = 10.0
    anchor: str = "start"  # start | middle | end
    colour: str = "#000000"
    bold: bool = False


@dataclass
class LegendItem:
    """A short sample line and its label."""

    x: float
    y: float
    colour: str
    dash: str
    width: float
    label: str


@dataclass
class Picture:
    width: float
    height: float
    boxes: list[Box] = field(default_factory=list)  # groups first, then nodes
    lines: list[Line] = field(default_factory=list)  # drawn in order: the last on top
    labels: list[Label] = field(default_factory=list)
    legend: list[LegendItem] = field(default_factory=list)
