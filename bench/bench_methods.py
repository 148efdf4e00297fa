"""Edge Pruning against EAP, EAP-IG and ACDC on SmolLM2-135M IOI, at matched edge counts.

Prints one JSON object per measurement and writes the table to bench/results/methods.md and the
rows to bench/results/methods.jsonl. Sized for a 2-core CPU (about 25 minutes): few examples and
short pruning runs, stated in the output. Settings come from environment variables so a bigger
machine can run the real thing::

    EDGEPRUNE_BENCH_TRAIN=200 EDGEPRUNE_BENCH_TEST=200 EDGEPRUNE_BENCH_STEPS=3000 \\
    EDGEPRUNE_BENCH_BATCH=32 EDGEPRUNE_BENCH_EP_EACH=1 EDGEPRUNE_BENCH_LR=0.8 \\
    EDGEPRUNE_BENCH_ACDC_FORWARDS=5000 \\
    python -m bench methods

Edge Pruning is warm-started from the EAP-IG scores (computed once and shared) and evaluated at
its binarised (deterministic) circuit. By default one run, trained towards the smallest matched
size, is cut at every size (EDGEPRUNE_BENCH_EP_EACH=1 trains one run per size instead); the same
run gives the pruning sweep over the MIB sizes. The scored methods are cut from their scores.
All circuits are evaluated on a held-out IOI test split. On a shared 2-core machine run it with
OMP_NUM_THREADS=1: oversubscribed threads make every step several times slower.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from edgeprune.engine.attribution import acdc, attribute, scored_circuit
from edgeprune.engine.circuit import Circuit
from edgeprune.engine.loading import load_model
from edgeprune.engine.metrics import evaluate_many
from edgeprune.engine.prune import PruneConfig, PruneResult, prune
from edgeprune.engine.sweep import MIB_SIZES, cmd, cpr
from edgeprune.engine.tasks import build_task

RESULTS = Path(__file__).resolve().parent / "results"
MATCHED_SIZES = (0.005, 0.01, 0.02, 0.05)


def _env(name: str, default: int) -> int:
    return int(os.environ.get(f"EDGEPRUNE_BENCH_{name}", default))


def _emit(row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def main() -> None:
    n_train, n_test = _env("TRAIN", 32), _env("TEST", 32)
    steps, batch = _env("STEPS", 40), _env("BATCH", 8)
    ig_steps, acdc_forwards = _env("IG_STEPS", 3), _env("ACDC_FORWARDS", 24)
    ep_each = bool(_env("EP_EACH", 0))
    # A short run from the EAP-IG warm start wants small steps: at the paper's 0.8 the early Adam
    # steps (about +-lr each, by the sign of a noisy gradient) scramble the ranking in a few steps.
    lr = float(os.environ.get("EDGEPRUNE_BENCH_LR", "0.05"))
    torch.manual_seed(0)
    start = time.perf_counter()
    model_ref = os.environ.get("EDGEPRUNE_BENCH_MODEL", "smollm2-135m")
    model = load_model(model_ref)
    tok = model.tokenizer
    train = build_task("ioi", tok, n=n_train, seed=0, split="train")
    test = build_task("ioi", tok, n=n_test, seed=0, split="test")
    E = model.graph.n_edges
    settings = {"model": model_ref, "task": "ioi", "edges_total": E, "train": n_train,
                "test": n_test, "prune_steps": steps, "batch": batch, "ig_steps": ig_steps,
                "acdc_forwards": acdc_forwards, "ep_run_per_size": ep_each, "lr": lr,
                "threads": torch.get_num_threads(),
                "load_s": round(time.perf_counter() - start, 1),
                "note": "short CPU runs (paper: 3000 steps, batch 32, 200 IOI examples)"}
    _emit({"bench": "methods", "settings": settings})

    timings: dict[str, float] = {}
    scores: dict[str, torch.Tensor] = {}
    for method in ("eap", "eap_ig"):
        t = time.perf_counter()
        scores[method] = attribute(model, train, method, ig_steps=ig_steps, batch_size=batch)
        timings[method] = time.perf_counter() - t

    circuits: list[tuple[str, float, Circuit, float]] = []  # (method, size, circuit, seconds)
    runs: dict[float, tuple[PruneResult, float]] = {}
    for size in MATCHED_SIZES if ep_each else MATCHED_SIZES[:1]:
        config = PruneConfig(steps=steps, batch_size=batch, n_edges=round(size * E),
                             edge_lr=lr, node_lr=lr, lambda_lr=lr,
                             warm_start="eap_ig", warm_start_ig_steps=ig_steps, seed=0)
        t = time.perf_counter()
        result = prune(model, train, config, warm_scores=scores["eap_ig"],
                       progress=lambda e: _emit({"bench": "methods", "step": e.step,
                                                 "kl": round(e.task_loss, 4),
                                                 "sparsity": round(e.expected_sparsity, 4),
                                                 "steps_per_s": round(e.steps_per_s, 3)}))
        runs[size] = (result, time.perf_counter() - t + timings["eap_ig"])
    sweep_run = runs[MATCHED_SIZES[0]][0]
    for size in MATCHED_SIZES:
        k = round(size * E)
        for method in ("eap", "eap_ig"):
            circuits.append((method, size, scored_circuit(model, train, scores[method], method=method,
                                                          n_edges=k), timings[method]))
        result, seconds = runs.get(size, runs[MATCHED_SIZES[0]])
        circuits.append(("edge_pruning", size, result.circuit_at(model, n_edges=k), seconds))

    t = time.perf_counter()
    acdc_set = train.subset(range(min(16, n_train)))
    acdc_result = acdc(model, acdc_set, threshold=0.05, max_forwards=acdc_forwards, batch_size=16)
    acdc_seconds = time.perf_counter() - t
    circuits.append(("acdc", acdc_result.circuit.n_edges / E, acdc_result.circuit, acdc_seconds))

    metrics = evaluate_many(model, [c for _, _, c, _ in circuits], test, batch_size=batch)
    rows = []
    for (method, size, circuit, seconds), m in zip(circuits, metrics, strict=True):
        row = {"bench": "methods", "method": method, "size": size, "edges": circuit.n_edges,
               "kl": m["kl"], "faithfulness": m.get("faithfulness", math.nan),
               "accuracy": m.get("accuracy", math.nan), "exact_match": m["exact_match"],
               "wall_s": round(seconds, 1)}
        if method == "acdc":
            row.update(budget_exhausted=acdc_result.budget_exhausted, tested=acdc_result.tested,
                       forwards=acdc_result.forwards)
        rows.append(row)
        _emit(row)

    # Sweeps over the MIB sizes: the scored methods from their scores, Edge Pruning from one run.
    sweep_rows = []
    for method in ("eap", "eap_ig", "edge_pruning"):
        made = []
        for size in MIB_SIZES:
            k = round(size * E)
            if method == "edge_pruning":
                made.append(sweep_run.circuit_at(model, n_edges=k))
            else:
                made.append(scored_circuit(model, train, scores[method], method=method, n_edges=k))
        results = evaluate_many(model, made, test, batch_size=batch)
        fractions = [c.n_edges / E for c in made]
        faithful = [r.get("faithfulness", math.nan) for r in results]
        row = {"bench": "methods", "sweep": method, "sizes": list(MIB_SIZES),
               "faithfulness": [round(f, 4) for f in faithful], "cpr": cpr(fractions, faithful),
               "cmd": cmd(fractions, faithful)}
        sweep_rows.append(row)
        _emit(row)

    total = time.perf_counter() - start
    _write(settings, rows, sweep_rows, total)
    _emit({"bench": "methods", "total_s": round(total, 1)})


def _write(settings: dict[str, Any], rows: list[dict[str, Any]], sweeps: list[dict[str, Any]],
           total: float) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "methods.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in [{"settings": settings}, *rows, *sweeps])
    lines = [
        f"# Circuit discovery methods on {settings['model']} IOI",
        "",
        f"Settings: {json.dumps(settings)}. Total {total / 60:.1f} min.",
        "",
        "| method | size | edges | KL | faithfulness | accuracy | exact match | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["size"], r["method"])):
        lines.append("| " + " | ".join(_fmt(r[k]) for k in (
            "method", "size", "edges", "kl", "faithfulness", "accuracy", "exact_match", "wall_s")) + " |")
    acdc_rows = [r for r in rows if r["method"] == "acdc"]
    if acdc_rows and acdc_rows[0]["budget_exhausted"]:
        lines += ["", (f"ACDC ran out of its budget of {settings['acdc_forwards']} forward passes after "
                      f"testing {acdc_rows[0]['tested']} of {settings['edges_total']} edges.")]
    lines += ["", "Sweeps over the MIB sizes (fraction of edges):", "",
              "| method | CPR (higher better) | CMD (lower better) | faithfulness per size |",
              "|---|---|---|---|"]
    for s in sweeps:
        lines.append(f"| {s['sweep']} | {s['cpr']:.4f} | {s['cmd']:.4f} | "
                     f"{', '.join(_fmt(f) for f in s['faithfulness'])} |")
    (RESULTS / "methods.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
