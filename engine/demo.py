"""Engine demo (``python -m edgeprune.engine.demo``; ``make demo`` runs the service's demo,
``edgeprune demo`` in client/demo.py).

Loads the default model (SmolLM2-135M-Instruct), prints the size of its edge graph, and answers an
indirect-object-identification (IOI) prompt three ways: with the full model, with every edge
ablated to the corrupted run (a prompt with three other names), and with one hand-picked partial
mask that cuts the direct path from the late attention heads to the logits.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
import transformers

from edgeprune.engine.loading import DEFAULT_MODEL, load_model
from edgeprune.engine.masked import CircuitModel

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Alice and Bob went to the store, Charlie gave a drink to"


def late_heads_to_logits(model: CircuitModel, layers: range) -> dict[str, float]:
    """Edge mask that ablates every edge from an attention head of ``layers`` into ``logits``."""
    heads = [f"a{layer}.h{h}" for layer in layers for h in range(model.n_heads)]
    return {f"{head}->logits": 0.0 for head in heads}


def answer(
    model: CircuitModel, ids: torch.Tensor, ablated: torch.Tensor | None, **masks
) -> list[tuple[str, float]]:
    """The top 3 next tokens and their probabilities at the last position."""
    last = torch.tensor([ids.shape[1] - 1])  # [B=1]
    with torch.no_grad():
        if ablated is None:
            logits = model.reference_logits(ids, positions=last)  # [1, V]
        else:
            logits = model.logits(ids, ablated=ablated, positions=last, **masks)  # [1, V]
    probs = logits[0].softmax(-1)  # [V]
    top = probs.topk(3)
    return [(model.tokenizer.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices)]


def demo_runs(model: CircuitModel) -> list[tuple[str, list[tuple[str, float]]]]:
    """(label, top-3 answers) for the full model, all edges ablated and the partial mask."""
    graph = model.graph
    clean = model.tokenizer(CLEAN, return_tensors="pt").input_ids  # [1, T]
    corrupted = model.tokenizer(CORRUPTED, return_tensors="pt").input_ids  # [1, T]
    ablated = model.ablation_outputs(corrupted)  # [W, 1, T, D], the corrupted run's writer outputs
    late = range(2 * model.n_layers // 3, model.n_layers)  # layers 20-29 of SmolLM2's 30
    partial = late_heads_to_logits(model, late)
    return [
        ("full model", answer(model, clean, None)),
        (f"all {graph.n_edges:,} edges ablated",
         answer(model, clean, ablated, edge_mask=torch.zeros(graph.n_edges))),
        (f"{len(partial)} edges a{late[0]}-a{late[-1]} heads -> logits ablated",
         answer(model, clean, ablated, edge_mask=partial)),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model reference (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    transformers.utils.logging.disable_progress_bar()

    start = time.perf_counter()
    model = load_model(args.model)
    graph = model.graph
    print(f"\n{model.name}: {model.arch}, {model.n_layers} layers, {model.n_heads} heads "
          f"({model.n_kv_heads} KV), loaded in {time.perf_counter() - start:.1f} s")
    print(f"graph: {graph.n_writers:,} writers, {len(graph.readers):,} readers, "
          f"{graph.n_edges:,} edges\n")
    print(f"prompt:    {CLEAN!r}")
    print(f"corrupted: {CORRUPTED!r}\n")
    for label, top in demo_runs(model):
        shown = ", ".join(f"{token!r} {p:.3f}" for token, p in top)
        print(f"{label:<42} -> {shown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
