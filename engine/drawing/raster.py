"""PNG files: a Picture painted with matplotlib, and any matplotlib figure saved as SVG or PNG.

matplotlib is imported on first use, without pyplot (no global figure state, safe in threads),
on the Agg canvas: servers have no display.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from typing import Any

from edgeprune.engine.drawing.picture import Picture
from edgeprune.engine.errors import InvalidArgument, NotSupported

IMAGE_FORMATS = ("svg", "png")
DPI = 100
MAX_PIXELS = 40_000_000  # a PNG larger than this is drawn at a lower resolution


def new_figure(width_in: float, height_in: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def save(figure: Any, fmt: str) -> bytes:
    """The figure as SVG or PNG bytes."""
    if fmt not in IMAGE_FORMATS:
        raise InvalidArgument(f"image format must be svg or png, not {fmt!r}", field="format")
    buffer = io.BytesIO()
    figure.savefig(buffer, format=fmt, dpi=figure.dpi, metadata={"Date": None}
                   if fmt == "svg" else None)
    return buffer.getvalue()


def have_rsvg() -> bool:
    return shutil.which("rsvg-convert") is not None


def svg_to_png(svg: str, *, timeout_s: float = 60.0) -> bytes:
    """librsvg's rendering of an SVG (several times faster than painting with matplotlib)."""
    exe = shutil.which("rsvg-convert")
    if exe is None:
        raise NotSupported("rsvg-convert is not installed here")
    try:
        done = subprocess.run([exe, "--format=png", "--background-color=white"],
                              input=svg.encode(), capture_output=True, timeout=timeout_s,
                              check=False)
    except subprocess.TimeoutExpired as err:
        raise NotSupported(f"rsvg-convert took over {timeout_s:.0f} s") from err
    if done.returncode != 0:
        raise NotSupported(f"rsvg-convert failed: {done.stderr.decode(errors='replace')[:200]}")
    return done.stdout


def picture_to_png(picture: Picture) -> bytes:
    """The picture painted as svg.py draws it (one pixel per SVG unit, less for huge ones)."""
    from matplotlib.patches import FancyBboxPatch, PathPatch
    from matplotlib.path import Path

    scale = min(1.0, (MAX_PIXELS / (picture.width * picture.height)) ** 0.5)
    figure = new_figure(picture.width * scale / DPI, picture.height * scale / DPI)
    ax = figure.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, picture.width)
    ax.set_ylim(picture.height, 0)  # y grows downwards, as in SVG
    ax.set_axis_off()
    pt = 72.0 / DPI * scale  # one SVG unit in points

    def dashes(pattern: str) -> Any:
        if not pattern:
            return "solid"
        return (0, tuple(float(v) for v in pattern.split()))

    for box in (b for b in picture.boxes if b.role == "group"):
        ax.add_patch(FancyBboxPatch((box.x, box.y), box.w, box.h,
                                    boxstyle=f"round,pad=0,rounding_size={box.rx}",
                                    fill=False, edgecolor=box.stroke, linewidth=pt,
                                    linestyle=dashes(box.dash)))
    for line in picture.lines:
        vertices, codes = [line.start], [Path.MOVETO]
        for segment in line.segments:
            if segment[0] == "C":
                vertices += list(segment[1:])
                codes += [Path.CURVE4] * 3
            else:
                vertices.append(segment[1])
                codes.append(Path.LINETO)
        ax.add_patch(PathPatch(Path(vertices, codes), fill=False, edgecolor=line.stroke,
                               alpha=line.opacity, linewidth=line.width * pt,
                               linestyle=dashes(line.dash)))
    for box in (b for b in picture.boxes if b.role != "group"):
        ax.add_patch(FancyBboxPatch((box.x, box.y), box.w, box.h,
                                    boxstyle=f"round,pad=0,rounding_size={min(box.rx, box.h / 2)}",
                                    facecolor=box.fill, edgecolor=box.stroke, linewidth=pt))
        if box.label:
            size = 10 if box.w >= 6 * len(box.label) else 8
            ax.text(box.x + box.w / 2, box.y + box.h / 2, box.label, ha="center", va="center",
                    fontsize=size * pt)
    for label in picture.labels:
        ax.text(label.x, label.y, label.text, ha={"start": "left", "middle": "center",
                                                  "end": "right"}[label.anchor],
                va="baseline", fontsize=label.size * pt, color=label.colour,
                fontweight="bold" if label.bold else "normal")
    for item in picture.legend:
        ax.plot([item.x, item.x + 28], [item.y, item.y], color=item.colour,
                linewidth=item.width * pt, linestyle=dashes(item.dash))
        ax.text(item.x + 34, item.y + 3.5, item.label, va="baseline", fontsize=10 * pt)
    return save(figure, "png")
