"""Plots of circuits and runs (matplotlib, SVG or PNG): kept edges per layer, faithfulness
against circuit size with the MIB areas shaded, and the training curves of an Edge Pruning run.

They take plain numbers, so a library user and the service (which reads them from stored
circuits and job events) draw the same plots.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from edgeprune.engine.circuit import Circuit
from edgeprune.engine.drawing.picture import EDGE_STYLES
from edgeprune.engine.drawing.raster import new_figure, save
from edgeprune.engine.errors import InvalidArgument
from edgeprune.engine.sweep import cmd, cpr

_LAYER = re.compile(r"^[am](\d+)")
_KINDS = ("q", "k", "v", "mlp", "logits")


def per_layer_counts(circuit: Circuit) -> tuple[list[str], dict[str, list[int]]]:
    """(bar labels, kept edges per bar for each input kind): one bar per layer by the layer of
    the reader the edge feeds, and one for ``logits``."""
    layers: dict[int, dict[str, int]] = {}
    logits = 0
    for edge in circuit.edges:
        reader = edge.partition("->")[2]
        if reader == "logits":
            logits += 1
            continue
        match = _LAYER.match(reader)
        if match is None:
            raise InvalidArgument(f"bad edge name {edge!r}", field="circuit.edges")
        kind = reader[-1] if reader[-2:] in (".q", ".k", ".v") else "mlp"
        bar = layers.setdefault(int(match[1]), dict.fromkeys(_KINDS, 0))
        bar[kind] += 1
    n_layers = max(layers, default=-1) + 1
    shape = circuit.provenance.get("graph")
    if isinstance(shape, dict) and isinstance(shape.get("n_layers"), int):
        n_layers = max(n_layers, shape["n_layers"])
    labels = [f"L{i}" for i in range(n_layers)] + ["logits"]
    counts = {kind: [layers.get(i, {}).get(kind, 0) for i in range(n_layers)] + [0]
              for kind in _KINDS}
    counts["logits"][-1] = logits
    return labels, counts


def per_layer_plot(circuit: Circuit, fmt: str = "svg", *, title: str = "") -> bytes:
    """Stacked bars of kept edges per layer, by the input they feed."""
    labels, counts = per_layer_counts(circuit)
    figure = new_figure(max(6.0, 0.32 * len(labels) + 2.0), 4.0)
    ax = figure.add_subplot()
    bottom = [0] * len(labels)
    for kind in _KINDS:
        label, colour, _, _ = EDGE_STYLES[kind]
        values = counts[kind]
        if any(values):
            ax.bar(range(len(labels)), values, bottom=bottom, color=colour, label=label,
                   width=0.8)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_xticks(range(len(labels)), labels, rotation=90 if len(labels) > 16 else 0,
                  fontsize=8)
    ax.set_ylim(0, max(max(bottom, default=0), 1) * 1.08)  # the tallest bar below the frame
    ax.set_ylabel("kept edges into the layer")
    ax.set_title(title or f"{circuit.model} · {circuit.method} · "
                 f"{len(circuit.edges)}/{circuit.total_edge_count} edges per layer", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return save(figure, fmt)


def faithfulness_plot(fractions: Sequence[float], faithfulness: Sequence[float],
                      fmt: str = "svg", *, title: str = "") -> bytes:
    """Faithfulness against the fraction of edges kept, with CPR (the area under the curve)
    and CMD (the area between the curve and 1) shaded, as engine/sweep.py computes them."""
    points = sorted((float(x), float(y)) for x, y in zip(fractions, faithfulness, strict=True)
                    if math.isfinite(y) and x > 0)
    if not points:
        raise InvalidArgument("no circuit with a size and a faithfulness to plot",
                              field="faithfulness")
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    area_cpr, area_cmd = cpr(xs, ys), cmd(xs, ys)
    figure = new_figure(6.4, 4.2)
    ax = figure.add_subplot()
    ax.fill_between(xs, 0, ys, color="#2ca02c", alpha=0.22, linewidth=0,
                    label=f"CPR (area under) {area_cpr:.3g}")
    ax.fill_between(xs, ys, 1, color="#ff7f0e", alpha=0.22, linewidth=0, hatch="//",
                    label=f"CMD (area to 1) {area_cmd:.3g}")
    ax.plot(xs, ys, "o-", color="#1f5fa8", label="faithfulness", markersize=4)
    ax.axhline(1.0, color="#444444", linestyle="--", linewidth=0.8)
    if len(xs) > 1 and xs[-1] / xs[0] >= 20:
        ax.set_xscale("log")
    ax.set_xlabel("fraction of edges kept")
    ax.set_ylabel("faithfulness")
    ax.set_title(title or "faithfulness against circuit size", fontsize=10)
    ax.legend(fontsize=8, frameon=False, loc="best")
    ax.grid(alpha=0.3)
    figure.tight_layout()
    return save(figure, fmt)


def training_plot(steps: Sequence[Mapping[str, Any]], fmt: str = "svg", *,
                  title: str = "") -> bytes:
    """Task loss, expected edge sparsity against its target, and the Lagrange multipliers, by
    step. ``steps``: one mapping per step with ``step`` and any of ``task_loss``, ``loss``,
    ``loss_name``, ``expected_edge_sparsity``, ``target_edge_sparsity``,
    ``expected_node_sparsity`` and ``lambdas`` (the names of the API's JobProgress)."""
    by_step = {int(s["step"]): s for s in steps if "step" in s}  # a resumed run repeats steps
    if not by_step:
        raise InvalidArgument("no training steps to plot", field="steps")
    xs = sorted(by_step)
    rows = [by_step[x] for x in xs]

    def series(key: str) -> list[float]:
        return [float(r.get(key, math.nan)) for r in rows]

    figure = new_figure(7.0, 7.2)
    loss_ax, sparsity_ax, lambda_ax = figure.subplots(3, 1, sharex=True)
    loss_name = next((r["loss_name"] for r in rows if r.get("loss_name")), "task")
    loss_ax.plot(xs, series("task_loss"), color="#1f5fa8", label=f"task loss ({loss_name})")
    loss_ax.set_ylabel(f"task loss ({loss_name})", color="#1f5fa8")
    # the Lagrangian can dwarf the task loss: the total gets its own scale on the right
    total_ax = loss_ax.twinx()
    total_ax.plot(xs, series("loss"), color="#999999", linewidth=0.8, label="total loss")
    total_ax.set_ylabel("total loss", color="#777777")
    sparsity_ax.plot(xs, series("expected_edge_sparsity"), color="#2ca02c",
                     label="expected edge sparsity")
    sparsity_ax.plot(xs, series("target_edge_sparsity"), color="#d62728", linestyle="--",
                     label="target")
    if any(math.isfinite(v) and v for v in series("expected_node_sparsity")):
        sparsity_ax.plot(xs, series("expected_node_sparsity"), color="#9467bd", linewidth=0.8,
                         label="expected node sparsity")
    sparsity_ax.set_ylabel("sparsity")
    width = max((len(r.get("lambdas") or ()) for r in rows), default=0)
    names = ["λ1 (edges)", "λ2 (edges)", "λ1 (nodes)", "λ2 (nodes)"]
    for i in range(width):
        values = [float(r["lambdas"][i]) if len(r.get("lambdas") or ()) > i else math.nan
                  for r in rows]
        lambda_ax.plot(xs, values, label=names[i] if i < len(names) else f"λ{i + 1}")
    lambda_ax.set_ylabel("Lagrange multipliers")
    lambda_ax.set_xlabel("step")
    for ax in (loss_ax, sparsity_ax, lambda_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, frameon=False, loc="best")
    loss_ax.set_title(title or "training", fontsize=10)
    figure.tight_layout()
    return save(figure, fmt)
