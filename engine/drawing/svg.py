"""A Picture as a self-contained SVG: every node, KV group and edge carries a hover title."""

from __future__ import annotations

from xml.sax.saxutils import escape

from edgeprune.engine.drawing.picture import Box, Label, LegendItem, Line, Picture


def to_svg(picture: Picture) -> str:
    w, h = picture.width, picture.height
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0f}" height="{h:.0f}" '
        f'viewBox="0 0 {w:.0f} {h:.0f}" font-family="Helvetica, Arial, sans-serif" font-size="10">'),
        f'<rect x="0" y="0" width="{w:.0f}" height="{h:.0f}" fill="white"/>',
    ]
    out += [_label(label) for label in picture.labels]
    out += [_legend(item) for item in picture.legend]
    out += [_box(b) for b in picture.boxes if b.role == "group"]
    out.append('<g fill="none">')
    out += [_line(line) for line in picture.lines]
    out.append("</g>")
    out += [_box(b) for b in picture.boxes if b.role != "group"]
    out.append("</svg>")
    return "\n".join(out) + "\n"


def path_data(line: Line) -> str:
    """The SVG path of a line: absolute M, C and L commands only."""
    parts = [f"M{line.start[0]:.1f},{line.start[1]:.1f}"]
    for segment in line.segments:
        if segment[0] == "C":
            (x1, y1), (x2, y2), (x, y) = segment[1:]
            parts.append(f"C{x1:.1f},{y1:.1f} {x2:.1f},{y2:.1f} {x:.1f},{y:.1f}")
        else:
            parts.append(f"L{segment[1][0]:.1f},{segment[1][1]:.1f}")
    return " ".join(parts)


def _line(line: Line) -> str:
    # the dash pattern comes last: readers of the file find an edge's kind just before its title
    dash = f' stroke-dasharray="{line.dash}"' if line.dash else ""
    return (f'<path d="{path_data(line)}" stroke="{line.stroke}" '
            f'stroke-width="{line.width:.2f}" stroke-opacity="{line.opacity:.2f}"{dash}>'
            f"<title>{escape(line.title)}</title></path>")


def _box(box: Box) -> str:
    dash = f' stroke-dasharray="{box.dash}"' if box.dash else ""
    text = ""
    if box.label:
        size = 10 if box.w >= 6 * len(box.label) else 8
        text = (f'<text x="{box.x + box.w / 2:.1f}" y="{box.y + box.h / 2 + 3.5:.1f}" '
                f'text-anchor="middle" font-size="{size}">{escape(box.label)}</text>')
    return (f'<g class="{box.role}"><title>{escape(box.title)}</title>'
            f'<rect x="{box.x:.1f}" y="{box.y:.1f}" width="{box.w:.1f}" height="{box.h:.1f}" '
            f'rx="{box.rx:.0f}" fill="{box.fill}" stroke="{box.stroke}"{dash}/>{text}</g>')


def _label(label: Label) -> str:
    weight = ' font-weight="bold"' if label.bold else ""
    return (f'<text x="{label.x:.1f}" y="{label.y:.1f}" font-size="{label.size:.0f}" '
            f'text-anchor="{label.anchor}" fill="{label.colour}"{weight}>'
            f"{escape(label.text)}</text>")


def _legend(item: LegendItem) -> str:
    dash = f' stroke-dasharray="{item.dash}"' if item.dash else ""
    return (f'<line x1="{item.x:.0f}" y1="{item.y:.0f}" x2="{item.x + 28:.0f}" y2="{item.y:.0f}" '
            f'stroke="{item.colour}" stroke-width="{item.width:.1f}"{dash}/>'
            f'<text x="{item.x + 34:.0f}" y="{item.y + 3.5:.1f}">{escape(item.label)}</text>')
