"""The built-in layered layout (no graphviz needed), readable at thousands of edges.

Rows from top to bottom: the embeddings, then per layer its attention heads and its MLP, and
``logits``; rows the drawing does not touch are left out. Heads sit in columns by head index (the
same column in every layer), KV groups side by side, the MLPs in a column of their own on the
right; the embeddings and ``logits`` are wide bars across the drawing.

Between the columns run vertical channels, at every KV group boundary and at both sides of the
MLP column. An edge between neighbouring rows is one Bézier curve in the gap between them; an
edge that skips rows curves into the channel nearest its two ends, runs straight down it, and
curves out into its target. Curves stay within the gap between two rows and straight runs within
a channel, so no edge passes through a node box. Each channel is as wide as the edges it carries
need (within bounds), each edge has its own lane in it, and the edges leave and enter every node
at ports ordered by where their other end lies, which keeps crossings down.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from edgeprune.engine.drawing.picture import (
    EDGE_STYLES,
    GROUP_STROKE,
    NODE_FILL,
    SIGN_COLOURS,
    SIGNED_KIND_COLOUR,
    Box,
    Label,
    LegendItem,
    Line,
    Picture,
    edge_colour,
    edge_opacity,
    edge_width,
)
from edgeprune.engine.drawing.scene import LOGITS_ROW, Edge, Scene, row_label

NODE_W, NODE_H = 58.0, 22.0
MLP_W = 64.0
HEAD_GAP = 6.0  # between heads of one KV group: no channel there
CHANNEL_MIN, CHANNEL_MAX, LANE = 16.0, 90.0, 1.1  # channel width: MIN + LANE per edge, capped
GROUP_PAD = 4.0  # a KV group's box around its heads
MARGIN = GROUP_PAD + 3.0  # lanes keep this far from the columns on either side
ROW_GAP = 64.0
LEFT, TOP = 78.0, 96.0  # room for the row labels, and for the title and legend


@dataclass
class _Columns:
    head_x: dict[int, float]  # head index -> centre
    mlp_x: float | None
    channels: list[tuple[float, float]]  # (left, right) of every channel, left to right
    right: float  # right end of the drawing's body


def layout(scene: Scene) -> Picture:
    """The scene laid out as shapes (see the module doc)."""
    heads = sorted({n.order for n in scene.nodes.values() if n.kind == "head"})
    has_mlp = any(n.kind == "mlp" for n in scene.nodes.values())
    row_index = {row: i for i, row in enumerate(scene.rows)}
    top_of = {row: TOP + i * (NODE_H + ROW_GAP) for row, i in row_index.items()}
    group = {h: h // scene.group_size for h in heads}

    def rows_between(e: Edge) -> bool:
        return row_index[scene.nodes[e.target].row] - row_index[scene.nodes[e.source].row] > 1

    skipping = [e for e in scene.edges if rows_between(e)]
    # First pass with narrow channels picks each skipping edge's channel; the second widens the
    # channels to their load (the channel order, so every choice, stays the same).
    cols = _columns(heads, group, has_mlp, {})
    boxes = _node_boxes(scene, cols, top_of)
    channel_of = {id(e): _nearest_channel(cols, _centre(boxes[e.source]),
                                          _centre(boxes[e.target])) for e in skipping}
    load = defaultdict(int)
    for c in channel_of.values():
        load[c] += 1
    widths = {c: min(CHANNEL_MAX, CHANNEL_MIN + LANE * n) for c, n in load.items()}
    cols = _columns(heads, group, has_mlp, widths)
    boxes = _node_boxes(scene, cols, top_of)
    frames = _group_frames(scene, boxes)

    # lanes: the edges of a channel side by side, ordered by where they come from and go to
    lane_x: dict[int, float] = {}
    members = defaultdict(list)
    for e in skipping:
        members[channel_of[id(e)]].append(e)
    for c, edges in members.items():
        left, right = cols.channels[c]
        edges.sort(key=lambda e: _centre(boxes[e.source]) + _centre(boxes[e.target]))
        span = right - left - 2 * MARGIN
        for k, e in enumerate(edges):
            lane_x[id(e)] = left + MARGIN + span * (k + 0.5) / len(edges)

    def target_box(e: Edge) -> Box:
        return frames[e.group_heads[0]] if e.group_heads else boxes[e.target]

    def toward_target(e: Edge) -> float:
        return lane_x.get(id(e), _centre(target_box(e)))

    def toward_source(e: Edge) -> float:
        return lane_x.get(id(e), _centre(boxes[e.source]))

    out_port = _ports(scene.edges, lambda e: (e.source, ""), toward_target,
                      lambda key: _span(boxes[key[0]]))
    in_port = _ports(scene.edges, lambda e: _inlet(e, scene), toward_source,
                     lambda key: _inlet_span(key, boxes, frames, scene))

    picture = Picture(width=cols.right + 20.0,
                      height=TOP + len(scene.rows) * (NODE_H + ROW_GAP) - ROW_GAP + 16.0)
    picture.boxes += frames.values()
    picture.boxes += boxes.values()
    for e in reversed(scene.edges):  # the most important edges are drawn last, on top
        src, dst = boxes[e.source], target_box(e)
        start = (out_port[id(e)], src.y + src.h)
        end = (in_port[id(e)], dst.y)
        if id(e) in lane_x:
            x = lane_x[id(e)]
            first = top_of[scene.rows[row_index[scene.nodes[e.source].row] + 1]]
            last_row = scene.rows[row_index[scene.nodes[e.target].row] - 1]
            last = top_of[last_row] + NODE_H
            segments = [_curve(start, (x, first)), ("L", (x, last)), _curve((x, last), end)]
        else:
            segments = [_curve(start, end)]
        picture.lines.append(Line(start, segments, edge_colour(e.kind, e.negative, scene.signed),
                                  edge_width(e.importance, scene.view),
                                  edge_opacity(e.importance), EDGE_STYLES[e.kind][2], _tip(e, scene.view)))
    for row in scene.rows:
        picture.labels.append(Label(8.0, top_of[row] + NODE_H / 2 + 3.5, row_label(row),
                                    colour="#666666"))
    picture.labels.append(Label(10.0, 20.0, scene.title, size=13.0, bold=True))
    picture.legend += legend(scene, 10.0, 40.0)
    if scene.note:
        picture.labels.append(Label(10.0, 74.0, scene.note, colour="#666666"))
    return picture


def legend(scene: Scene, x: float, y: float) -> list[LegendItem]:
    """Line samples: one per input kind, then the sign colours of a signed circuit."""
    items = []
    for i, (label, colour, dash, _) in enumerate(EDGE_STYLES.values()):
        items.append(LegendItem(x + i * 105, y, SIGNED_KIND_COLOUR if scene.signed else colour,
                                dash, 2.0, label))
    if scene.signed:
        for i, (label, colour) in enumerate(SIGN_COLOURS.items()):
            items.append(LegendItem(x + (len(EDGE_STYLES) + i) * 105, y, colour, "", 2.0,
                                    f"{label} score"))
    what = ("edges between the nodes" if scene.view == "nodes" else
            "keep probability" if scene.method == "edge_pruning" else "|score|")
    items.append(LegendItem(x, y + 16, "#333333", "", 3.0, f"width: {what}"))
    return items


def _tip(e: Edge, view: str) -> str:
    if view == "nodes":
        return f"{e.name} ({e.count} edge{'s' if e.count > 1 else ''})"
    tip = f"{e.name} ({EDGE_STYLES[e.kind][0]}) importance {e.importance:.3g}"
    return tip if e.score is None else f"{tip} score {e.score:.4g}"


def _curve(a: tuple[float, float], b: tuple[float, float]) -> tuple:
    """A Bézier from a down to b with vertical tangents: its y stays between a's and b's."""
    bend = (b[1] - a[1]) / 2
    return ("C", (a[0], a[1] + bend), (b[0], b[1] - bend), b)


def _columns(heads: list[int], group: dict[int, int], has_mlp: bool,
             widths: dict[int, float]) -> _Columns:
    """x of every column and channel: channel, group, channel, group, ..., channel, MLP, channel
    (``widths``: channel index -> width, CHANNEL_MIN where not given)."""
    x = LEFT
    channels: list[tuple[float, float]] = []
    head_x: dict[int, float] = {}

    def channel() -> None:
        nonlocal x
        w = widths.get(len(channels), CHANNEL_MIN)
        channels.append((x, x + w))
        x += w

    channel()
    for i, h in enumerate(heads):
        if i and group[h] != group[heads[i - 1]]:
            channel()
        elif i:
            x += HEAD_GAP
        head_x[h] = x + NODE_W / 2
        x += NODE_W
    mlp_x = None
    if has_mlp:
        if heads:
            channel()
        mlp_x = x + MLP_W / 2
        x += MLP_W
    channel()
    return _Columns(head_x, mlp_x, channels, x)


def _node_boxes(scene: Scene, cols: _Columns, top_of: dict[int, float]) -> dict[str, Box]:
    """Heads in their columns, MLPs in theirs, embeddings and logits as bars across."""
    body = (cols.channels[0][1], cols.channels[-1][0])
    if body[1] - body[0] < 2 * NODE_W:
        body = (body[0], body[0] + 2 * NODE_W)
    top_degree = max(scene.degree.values(), default=1) or 1
    boxes: dict[str, Box] = {}
    embeds = sorted((n for n in scene.nodes.values() if n.kind == "embed"), key=lambda n: n.order)
    for name, n in scene.nodes.items():
        y = top_of[n.row]
        if n.kind == "embed":
            share = (body[1] - body[0] - 10 * (len(embeds) - 1)) / len(embeds)
            left = body[0] + embeds.index(n) * (share + 10)
            x, w = left, share
        elif n.kind == "logits":
            x, w = body[0], body[1] - body[0]
        else:
            full = NODE_W if n.kind == "head" else MLP_W
            centre = cols.head_x[n.order] if n.kind == "head" else cols.mlp_x
            assert centre is not None
            # node view: a node's size shows how many kept edges it has
            w = full * (0.4 + 0.6 * math.sqrt(scene.degree.get(name, 0) / top_degree)) \
                if scene.view == "nodes" else full
            x = centre - w / 2
        rx = 10.0 if n.kind in ("embed", "logits") else 3.0
        boxes[name] = Box(x, y, w, NODE_H, NODE_FILL[n.kind], "#444444", name, name, rx)
    return boxes


def _group_frames(scene: Scene, boxes: dict[str, Box]) -> dict[str, Box]:
    """A box around the heads of every KV group that k/v edges enter, keyed by each member."""
    frames: dict[str, Box] = {}
    for e in scene.edges:
        if not e.group_heads or e.group_heads[0] in frames:
            continue
        members = [boxes[h] for h in e.group_heads]
        left = min(b.x for b in members) - GROUP_PAD
        right = max(b.x + b.w for b in members) + GROUP_PAD
        top = members[0].y - GROUP_PAD
        layer = e.group_heads[0].split(".")[0][1:]
        g = scene.nodes[e.group_heads[0]].group
        frame = Box(left, top, right - left, NODE_H + 2 * GROUP_PAD, "none", GROUP_STROKE,
                    f"KV group {g} of layer {layer} ({', '.join(e.group_heads)})",
                    rx=5.0, role="group", dash="3 2")
        for h in e.group_heads:
            frames[h] = frame
    return frames


def _centre(box: Box) -> float:
    return box.x + box.w / 2


def _span(box: Box) -> tuple[float, float]:
    inset = min(4.0, box.w / 4)
    return box.x + inset, box.x + box.w - inset


def _nearest_channel(cols: _Columns, xs: float, xt: float) -> int:
    """The channel that makes the shortest detour between x = xs and x = xt."""
    def cost(c: int) -> tuple[float, float]:
        mid = sum(cols.channels[c]) / 2
        return abs(mid - xs) + abs(mid - xt), abs(mid - (xs + xt) / 2)
    return min(range(len(cols.channels)), key=cost)


def _inlet(e: Edge, scene: Scene) -> tuple[str, str]:
    """Which stretch of which box top an edge enters: a head's q/k/v third, a KV group's k/v half."""
    if e.group_heads:
        return e.group_heads[0], "group-" + e.kind
    if scene.nodes[e.target].kind == "head":
        return e.target, e.kind
    return e.target, ""


def _inlet_span(key: tuple[str, str], boxes: dict[str, Box], frames: dict[str, Box],
                scene: Scene) -> tuple[float, float]:
    name, part = key
    if part.startswith("group-"):
        left, right = _span(frames[name])
        mid = (left + right) / 2
        return (left, mid) if part == "group-k" else (mid, right)
    left, right = _span(boxes[name])
    if not part:
        return left, right
    if name in frames:  # k/v enter the group's box: q takes the whole head
        return (left, right) if part == "q" else _thirds(left, right, part)
    return _thirds(left, right, part)


def _thirds(left: float, right: float, part: str) -> tuple[float, float]:
    third = (right - left) / 3
    i = "qkv".index(part)
    return left + i * third, left + (i + 1) * third


def _ports(edges: list[Edge], key_of, other_end, span_of) -> dict[int, float]:
    """x of every edge's port on its box: the edges of one stretch spread over it in the order
    of their other ends' x, so neighbouring edges do not cross at the box."""
    by_key: dict[tuple[str, str], list[Edge]] = defaultdict(list)
    for e in edges:
        by_key[key_of(e)].append(e)
    ports: dict[int, float] = {}
    for key, members in by_key.items():
        left, right = span_of(key)
        members.sort(key=other_end)
        for k, e in enumerate(members):
            ports[id(e)] = left + (right - left) * (k + 0.5) / len(members)
    return ports


__all__ = ["LOGITS_ROW", "layout", "legend"]
