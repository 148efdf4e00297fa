"""Circuit drawings and plots, rendered: the built-in layout keeps a 1,500-edge GPT-2-sized
circuit's edges out of every node box, graphviz and librsvg turn the pictures into PNGs that
decode, importance follows the method's score semantics, and the filters and views draw what
they say."""

from __future__ import annotations

import io
import math
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image

from edgeprune.engine.circuit import Circuit, build_circuit
from edgeprune.engine.drawing import DrawOptions, draw, ranked_edges
from edgeprune.engine.drawing.layout import layout
from edgeprune.engine.drawing.picture import SIGN_COLOURS
from edgeprune.engine.drawing.plots import (
    faithfulness_plot,
    per_layer_counts,
    per_layer_plot,
    training_plot,
)
from edgeprune.engine.drawing.raster import picture_to_png
from edgeprune.engine.drawing.scene import build_scene
from edgeprune.engine.errors import InvalidArgument, NotSupported
from edgeprune.engine.graph import Graph

SVG = "{http://www.w3.org/2000/svg}"
BUILTIN = DrawOptions(layout="builtin")
needs_rsvg = pytest.mark.skipif(shutil.which("rsvg-convert") is None,
                                reason="librsvg2-bin is not installed (.ci/run installs it)")
needs_dot = pytest.mark.skipif(shutil.which("dot") is None,
                               reason="graphviz is not installed (.ci/run installs it)")


@pytest.fixture(scope="module")
def big() -> Circuit:
    """1,500 edges of a GPT-2-sized graph, scores concentrated on some writers and readers."""
    graph = Graph.build(12, 12, 12, True)
    gen = torch.Generator().manual_seed(0)
    w, r = torch.rand(graph.n_writers, generator=gen) ** 4, torch.rand(graph.n_readers, generator=gen) ** 4
    scores = w[graph.edge_writer] + r[graph.edge_reader] + 0.3 * torch.rand(graph.n_edges, generator=gen)
    return build_circuit(graph, scores, edge_count=1500, model="gpt2", method="eap")


@pytest.fixture(scope="module")
def gqa() -> tuple[Graph, Circuit]:
    graph = Graph.build(4, 4, 2, True)
    scores = torch.rand(graph.n_edges, generator=torch.Generator().manual_seed(1))
    return graph, build_circuit(graph, scores, edge_count=80, model="tiny", method="eap")


def _png(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def check_picture(data: bytes, *, min_size: int = 200, min_colours: int = 6,
                  min_ink: float = 0.01) -> np.ndarray:
    """A PNG that decodes to a sane size, with several colours and some non-white pixels."""
    pixels = _png(data)
    h, w, _ = pixels.shape
    assert min_size <= w <= 20_000 and min_size <= h <= 20_000, (w, h)
    packed = pixels.astype(np.int32) @ np.array([1 << 16, 1 << 8, 1])  # [H, W] one int a colour
    assert len(np.unique(packed)) >= min_colours
    assert (pixels.min(axis=2) < 240).mean() >= min_ink
    return pixels


def rsvg(svg: str) -> bytes:
    return subprocess.run(["rsvg-convert", "--format=png"], input=svg.encode(),
                          capture_output=True, check=True, timeout=60).stdout


def _bezier(p0, p1, p2, p3, n: int = 24) -> np.ndarray:
    t = np.linspace(0, 1, n)[:, None]
    return ((1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t ** 2 * p2
            + t ** 3 * p3)


def path_points(d: str) -> np.ndarray:
    """Points along an SVG path of absolute M, C and L commands."""
    tokens = re.findall(r"[MCL]|-?\d+(?:\.\d+)?", d)
    points, here, i = [], None, 0
    while i < len(tokens):
        cmd = tokens[i]
        if cmd == "M":
            here = np.array([float(tokens[i + 1]), float(tokens[i + 2])])
            i += 3
        elif cmd == "L":
            end = np.array([float(tokens[i + 1]), float(tokens[i + 2])])
            points.append(np.linspace(here, end, 40))
            here, i = end, i + 3
        else:
            c = [np.array([float(tokens[i + 1 + 2 * k]), float(tokens[i + 2 + 2 * k])])
                 for k in range(3)]
            points.append(_bezier(here, *c))
            here, i = c[2], i + 7
    return np.concatenate(points)


def test_builtin_layout_keeps_1500_edges_out_of_node_boxes(big: Circuit) -> None:
    svg = draw(big, "svg", options=BUILTIN)
    root = ET.fromstring(svg)
    boxes = np.array([[float(r.get(k)) for k in ("x", "y", "width", "height")]
                      for g in root.iter(f"{SVG}g") if g.get("class") == "node"
                      for r in [g.find(f"{SVG}rect")]])
    paths = [p for p in root.iter(f"{SVG}path")]
    assert len(paths) == 1500 and len(boxes) == len(big.nodes)
    points = np.concatenate([path_points(p.get("d")) for p in paths])  # [N, 2]
    x, y = points[:, :1], points[:, 1:]
    inside = ((x > boxes[:, 0] + 0.5) & (x < boxes[:, 0] + boxes[:, 2] - 0.5)
              & (y > boxes[:, 1] + 0.5) & (y < boxes[:, 1] + boxes[:, 3] - 0.5))  # [N, B]
    assert not inside.any(), f"{int(inside.any(axis=1).sum())} points inside node boxes"
    # edges that skip layers run in the channels, so the drawing is not one bundle down a column
    xs = {round(float(v)) for p in paths for v in path_points(p.get("d"))[30:50, 0]}
    assert len(xs) > 200


@needs_rsvg
def test_builtin_drawing_renders_to_png(big: Circuit) -> None:
    options = DrawOptions(top_k=400, layout="builtin")
    pixels = check_picture(draw(big, "png", options=options), min_size=600, min_colours=20,
                           min_ink=0.03)
    assert pixels.shape[0] > 800  # a dozen layers, two rows each


def test_png_without_librsvg_paints_the_same_picture(gqa: tuple[Graph, Circuit]) -> None:
    graph, circuit = gqa
    picture = layout(build_scene(circuit, graph=graph))
    pixels = check_picture(picture_to_png(picture), min_colours=10)
    assert pixels.shape[:2] == (round(picture.height), round(picture.width))


@needs_dot
@needs_rsvg
def test_graphviz_layout_renders(gqa: tuple[Graph, Circuit]) -> None:
    graph, circuit = gqa
    svg = draw(circuit, "svg", graph=graph, options=DrawOptions(layout="graphviz"))
    assert "<svg" in svg and "a1.h2" in svg and "cluster_a" in svg  # KV groups are clusters
    check_picture(rsvg(svg), min_colours=10)
    check_picture(draw(circuit, "png", graph=graph, options=DrawOptions(layout="graphviz")))


def test_kv_edges_enter_their_group_box(gqa: tuple[Graph, Circuit]) -> None:
    graph, circuit = gqa
    root = ET.fromstring(draw(circuit, "svg", graph=graph, options=BUILTIN))
    frames = {g.find(f"{SVG}title").text: g.find(f"{SVG}rect") for g in root.iter(f"{SVG}g")
              if g.get("class") == "group"}
    kv = [e for e in circuit.edges if e.endswith((".k", ".v"))]
    assert kv and frames
    for p in root.iter(f"{SVG}path"):
        name = p.find(f"{SVG}title").text.split(" ")[0]
        if name not in kv:
            continue
        heads = graph.reader_heads(name.partition("->")[2])
        frame = next(r for t, r in frames.items() if f"({', '.join(heads)})" in t)
        end = path_points(p.get("d"))[-1]
        left, width = float(frame.get("x")), float(frame.get("width"))
        assert end[1] == pytest.approx(float(frame.get("y")), abs=0.1)
        assert left <= end[0] <= left + width


def test_edge_pruning_draws_firmly_off_edges_thin_and_ranks_them_last() -> None:
    c = Circuit(model="m", method="edge_pruning",
                edges=["tok->a0.h0.q", "tok->m0", "a0.h0->logits"],
                edge_scores={"tok->a0.h0.q": -9.0, "tok->m0": 0.0, "a0.h0->logits": 6.0},
                nodes=[], total_edge_count=10)
    ranked = ranked_edges(c)
    assert [e for e, _ in ranked] == ["a0.h0->logits", "tok->m0", "tok->a0.h0.q"]
    assert ranked[0][1] > 0.99 and ranked[-1][1] < 0.01  # keep probabilities
    assert 0.5 < ranked[1][1] < 0.9  # log_alpha 0 is on more often than not
    widths = {p.find(f"{SVG}title").text.split(" ")[0]: float(p.get("stroke-width"))
              for p in ET.fromstring(draw(c, "svg", options=BUILTIN)).iter(f"{SVG}path")}
    assert widths["tok->a0.h0.q"] < 0.5 and widths["a0.h0->logits"] > 2.5


def test_signed_scores_are_coloured_by_sign() -> None:
    c = Circuit(model="m", method="eap", edges=["tok->m0", "m0->logits"],
                edge_scores={"tok->m0": -2.0, "m0->logits": 1.0}, nodes=[], total_edge_count=5)
    assert [e for e, _ in ranked_edges(c)] == ["tok->m0", "m0->logits"]  # by |score|
    svg = draw(c, "svg", options=BUILTIN)
    assert re.search(rf'stroke="{SIGN_COLOURS["negative"]}"[^>]*><title>tok-&gt;m0 ', svg)
    assert re.search(rf'stroke="{SIGN_COLOURS["positive"]}"[^>]*><title>m0-&gt;logits ', svg)
    assert "negative score" in svg


def test_top_k_node_filter_and_node_view(big: Circuit) -> None:
    top = [e for e, _ in ranked_edges(big)][:25]
    scene = build_scene(big, top_k=25)
    assert [e.name for e in scene.edges] == top and "25 most important of 1500" in scene.note
    touching = build_scene(big, nodes=["m3"])
    assert touching.edges and all("m3" in (e.source, e.target) for e in touching.edges)
    assert len(touching.edges) == sum(e.startswith("m3->") or e.endswith("->m3") for e in big.edges)
    nodes = build_scene(big, view="nodes")
    pairs = {(e.source, e.target) for e in build_scene(big).edges}
    assert len(nodes.edges) == len(pairs) and sum(e.count for e in nodes.edges) == 1500
    root = ET.fromstring(draw(big, "svg", options=DrawOptions(view="nodes", layout="builtin")))
    widths = {float(g.find(f"{SVG}rect").get("width")) for g in root.iter(f"{SVG}g")
              if g.get("class") == "node" and g.find(f"{SVG}title").text.startswith("a")}
    assert len(widths) > 5  # heads sized by their kept edges
    for bad, field in ((DrawOptions(top_k=0), "top_k"), (DrawOptions(nodes=("x9",)), "nodes"),
                       (DrawOptions(view="cloud"), "view"), (DrawOptions(layout="neato"), "layout")):
        with pytest.raises(InvalidArgument) as err:
            draw(big, "svg", options=bad)
        assert err.value.field == field


def test_per_layer_counts_and_plots(big: Circuit) -> None:
    labels, counts = per_layer_counts(big)
    assert labels == [f"L{i}" for i in range(12)] + ["logits"]
    assert sum(sum(v) for v in counts.values()) == 1500
    assert counts["logits"][-1] == sum(e.endswith("->logits") for e in big.edges)
    assert counts["q"][3] == sum(re.search(r"->a3\.h\d+\.q$", e) is not None for e in big.edges)
    assert b"<svg" in per_layer_plot(big, "svg")
    check_picture(per_layer_plot(big, "png"), min_colours=6)


def test_faithfulness_and_training_plots() -> None:
    fractions = [0.001, 0.01, 0.05, 0.1, 0.5, 1.0]
    faithfulness = [0.1, 0.4, 0.8, 0.9, 1.05, 1.0]
    svg = faithfulness_plot(fractions, faithfulness, "svg").decode()
    assert "CPR" in svg and "CMD" in svg
    check_picture(faithfulness_plot(fractions, faithfulness, "png"), min_colours=20)
    steps = [{"step": s, "task_loss": 2.0 / (1 + s), "loss": 2.5 / (1 + s), "loss_name": "kl",
              "expected_edge_sparsity": 1 - math.exp(-s / 20), "target_edge_sparsity": min(0.95, s / 60),
              "lambdas": [0.01 * s, -0.002 * s]} for s in range(1, 101)]
    check_picture(training_plot(steps + steps[:10], "png"), min_colours=20)  # a resumed run repeats steps
    with pytest.raises(InvalidArgument):
        training_plot([], "png")
    with pytest.raises(InvalidArgument):
        faithfulness_plot([0.1], [math.nan], "png")


def test_without_graphviz_and_librsvg(gqa: tuple[Graph, Circuit], monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither binary on PATH: "auto" draws with the built-in layout and paints PNGs with
    matplotlib; asking for graphviz says it is not there."""
    graph, circuit = gqa
    monkeypatch.setenv("PATH", "/nonexistent")
    svg = draw(circuit, "svg", graph=graph)
    assert 'class="group"' in svg  # the built-in layout's KV group boxes
    check_picture(draw(circuit, "png", graph=graph, options=DrawOptions(top_k=30)), min_colours=8)
    with pytest.raises(NotSupported, match="graphviz"):
        draw(circuit, "svg", graph=graph, options=DrawOptions(layout="graphviz"))
