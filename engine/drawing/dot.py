"""Graphviz DOT of a scene, and drawings laid out by graphviz's ``dot`` where it is installed.

One rank per row (the rows of the built-in layout), nodes in head order, every KV group that
key/value edges enter as a cluster the edges end at (``lhead``), edges coloured and dashed as
in the built-in drawing, width by importance.
"""

from __future__ import annotations

import shutil
import subprocess

from edgeprune.engine.drawing.picture import (
    EDGE_STYLES,
    GROUP_STROKE,
    NODE_FILL,
    edge_colour,
    edge_width,
)
from edgeprune.engine.drawing.scene import Scene, row_label
from edgeprune.engine.errors import NotSupported

GRAPHVIZ_TIMEOUT_S = 60.0
_SHAPES = {"embed": "ellipse", "head": "box", "mlp": "box", "logits": "octagon"}


def scene_to_dot(scene: Scene) -> str:
    out = [
        "digraph circuit {",
        (f"  label={_str(scene.title + (' · ' + scene.note if scene.note else ''))}; labelloc=t; "
        "rankdir=TB; nodesep=0.15; ranksep=0.6; newrank=true; compound=true;"),
        '  node [fontname="Helvetica", fontsize=10, style=filled, height=0.3];',
        "  edge [arrowsize=0.5];",
    ]
    groups: dict[tuple[str, ...], str] = {}
    for e in scene.edges:
        if e.group_heads and e.group_heads not in groups:
            groups[e.group_heads] = f"cluster_{e.group_heads[0].replace('.', '_')}"
    grouped = {h for heads in groups for h in heads}
    top_degree = max(scene.degree.values(), default=1) or 1
    for row in scene.rows:
        members = sorted((n for n in scene.nodes.values() if n.row == row), key=lambda n: n.order)
        out.append(f"  {{ rank=same; // {row_label(row)}")
        for n in members:
            size = ""
            if scene.view == "nodes" and n.kind in ("head", "mlp"):
                size = f", width={0.4 + 0.8 * (scene.degree.get(n.name, 0) / top_degree) ** 0.5:.2f}"
            out.append(f"    {_str(n.name)} [shape={_SHAPES[n.kind]}, "
                       f"fillcolor={_str(NODE_FILL[n.kind])}{size}];")
        out.append("  }")
    for heads, cluster in groups.items():
        out.append(f"  subgraph {cluster} {{ label=\"\"; style=\"rounded,dashed\"; "
                   f"color={_str(GROUP_STROKE)}; " + " ".join(_str(h) for h in heads) + " }")
    for e in reversed(scene.edges):  # the most important last, on top
        _, _, _, style = EDGE_STYLES[e.kind]
        colour = edge_colour(e.kind, e.negative, scene.signed)
        tip = f"{e.name} ({e.count} edges)" if scene.view == "nodes" else (
            e.name if e.score is None else f"{e.name} ({e.score:.4g})")
        head = f", lhead={groups[e.group_heads]}" if e.group_heads else ""
        out.append(
            f"  {_str(e.source)} -> {_str(e.target)} [color={_str(colour)}, style={style}, "
            f"penwidth={edge_width(e.importance, scene.view):.2f}, tooltip={_str(tip)}{head}];")
    out.append('  subgraph cluster_legend { label="inputs"; fontsize=10; color="#bbbbbb";')
    for i, (kind, (label, colour, _, style)) in enumerate(EDGE_STYLES.items()):
        out.append(f'    legend_{i}a [label="", shape=point, width=0.05]; '
                   f'legend_{i}b [label={_str(label)}, shape=plaintext, style=""];')
        out.append(f"    legend_{i}a -> legend_{i}b [color={_str(colour)}, style={style}]; // {kind}")
    out.append("  }")
    if grouped:
        out.append("  // KV groups: key/value edges end at the box around their group's heads")
    out.append("}")
    return "\n".join(out) + "\n"


def _str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def have_graphviz() -> bool:
    return shutil.which("dot") is not None


def run_graphviz(dot: str, fmt: str) -> bytes:
    """``dot -T{fmt}`` on the DOT source; NotSupported where graphviz is missing or fails."""
    exe = shutil.which("dot")
    if exe is None:
        raise NotSupported("graphviz (dot) is not installed here; use the built-in layout")
    try:
        done = subprocess.run([exe, f"-T{fmt}"], input=dot.encode(), capture_output=True,
                              timeout=GRAPHVIZ_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as err:
        raise NotSupported(f"graphviz took over {GRAPHVIZ_TIMEOUT_S:.0f} s; use the built-in "
                           "layout or fewer edges (top_k)") from err
    if done.returncode != 0:
        raise NotSupported(f"graphviz failed: {done.stderr.decode(errors='replace')[:200]}")
    return done.stdout
