"""Write the example pictures of docs/service.md's Pictures section into docs/images/
(``python -m tools.make_pictures``).

Runs on CPU, offline, in a few minutes: a randomly initialised GPT-2-shaped model (the tests'
``tiny_gpt2`` at 12 layers x 12 heads: GPT-2 small's graph of 32,936 edges, but 48 wide), on
built-in IOI. The pictures are of real runs of that model:

- ``circuit-drawing.png``: EAP-IG's 1,500-edge circuit, built-in layout;
- ``circuit-nodes.png``: the same circuit's node view;
- ``per-layer.png``: its kept edges per layer;
- ``sweep-faithfulness.png``: an EAP-IG sweep's faithfulness against size, CPR/CMD shaded;
- ``training.png``: an Edge Pruning run's loss, sparsity against target, and multipliers.

The weights are random, so the circuits say nothing about GPT-2: the pictures show what a person
sees, at the sizes they see it.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import subprocess
import tempfile
from pathlib import Path

from PIL import Image

from edgeprune.engine import attribution
from edgeprune.engine.drawing import DrawOptions, draw
from edgeprune.engine.drawing.plots import faithfulness_plot, per_layer_plot, training_plot
from edgeprune.engine.loading import load_model
from edgeprune.engine.prune import PruneConfig, prune
from edgeprune.engine.sweep import sweep
from edgeprune.engine.tasks import build_task
from tests.tiny_models import tiny_gpt2

ROOT = Path(__file__).resolve().parent.parent
MAX_BYTES = 300 * 1024  # docs images stay small


def shrink_png(svg: str, path: Path, zoom: float) -> None:
    """rsvg-convert at ``zoom``, in a 64-colour palette (thousands of anti-aliased lines
    compress badly in full colour), the zoom lowered until the file fits MAX_BYTES."""
    while True:
        png = subprocess.run(["rsvg-convert", "--format=png", "--background-color=white",
                              f"--zoom={zoom}"], input=svg.encode(), check=True,
                             capture_output=True).stdout
        image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=64)
        image.save(path, optimize=True)
        if path.stat().st_size <= MAX_BYTES or zoom < 0.3:
            return
        zoom *= 0.9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # GPT-2 small's graph (12 x 12 heads, learned positions) at 48 wide
        model = load_model(f"hf:{tiny_gpt2(Path(tmp), n_layer=12, n_head=12, d_model=48)}")
    train = build_task("ioi", model.tokenizer, n=32, split="train")
    test = build_task("ioi", model.tokenizer, n=32, split="test")

    scores = attribution.attribute(model, train, "eap_ig", ig_steps=3)
    circuit = attribution.scored_circuit(model, train, scores, method="eap_ig", edge_count=1500)
    circuit.model = "gpt2-shaped (random)"
    svg = str(draw(circuit, "svg", options=DrawOptions(layout="builtin")))
    shrink_png(svg, args.out / "circuit-drawing.png", 1.0)
    nodes = str(draw(circuit, "svg", options=DrawOptions(layout="builtin", view="nodes")))
    shrink_png(nodes, args.out / "circuit-nodes.png", 1.0)
    (args.out / "per-layer.png").write_bytes(per_layer_plot(circuit, "png"))

    result = sweep(model, train, test, method="eap_ig", ig_steps=3,
                   sizes=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0))
    kept = [c.edge_count / c.total_edge_count for c in result.circuits]
    faith = [c.metrics["faithfulness"] for c in result.circuits]
    (args.out / "sweep-faithfulness.png").write_bytes(faithfulness_plot(
        kept, faith, "png", title="EAP-IG sweep on IOI: faithfulness against size"))

    steps: list[dict] = []

    def record(event: object) -> None:
        if hasattr(event, "expected_sparsity"):
            steps.append({"step": event.step, "task_loss": event.task_loss, "loss": event.loss,
                          "loss_name": event.loss_name,
                          "expected_edge_sparsity": event.expected_sparsity,
                          "target_edge_sparsity": event.target,
                          "expected_node_sparsity": event.node_sparsity or 0.0,
                          "lambdas": list(event.lambdas.values())})

    config = dataclasses.replace(PruneConfig(), edge_sparsity=0.95, steps=40, batch_size=8)
    prune(model, train, config, progress=record)
    (args.out / "training.png").write_bytes(training_plot(
        steps, "png", title="Edge Pruning on IOI at 95 % edge sparsity: training"))
    for path in sorted(args.out.glob("*.png")):
        print(f"{path.relative_to(ROOT)}: {path.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
