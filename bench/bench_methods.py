"""Circuit discovery methods compared on SmolLM2-135M: Edge Pruning with the default settings and
with a hand-tuned recipe, EAP-IG (over the input embeddings, as MIB defines it) and EAP.

Per task (IOI and gendered pronouns by default) it reports held-out KL, faithfulness, accuracy and
pairwise accuracy at 98, 99 and 99.5 % edge sparsity, and the sweep over the MIB sizes (CPR, CMD)
with each method's wall time. Prints one JSON object per measurement and writes
bench/results/methods.jsonl and the page bench/results/methods.md.

- "edge_pruning" is a job that names only its size: ``PruneConfig(edge_sparsity=s)``, the engine's
  defaults, one run per size, its EAP-IG warm start timed with it.
- "edge_pruning_tuned" is the recipe earlier versions needed by hand: 40 steps, learning rates
  0.05, a warm start from EAP-IG over the edge masks (3 points) clamped to [-3, 3], the
  Lagrangian on the mean sparsity.
- An Edge Pruning sweep is what the service runs: one default run at the sparsest size, cut at
  every size.

Sized for a 2-core CPU (32 training and 32 test prompts a task, batch 8); environment variables
scale it up::

    EDGEPRUNE_BENCH_TRAIN=200 EDGEPRUNE_BENCH_TEST=200 EDGEPRUNE_BENCH_BATCH=32 \\
    EDGEPRUNE_BENCH_TASKS=ioi,gendered_pronoun,greater_than python -m bench methods

``EDGEPRUNE_BENCH_PARTS=sweep`` runs the sweeps alone and ``EDGEPRUNE_BENCH_OUT=name`` writes
bench/results/name.md and name.jsonl instead of methods.*.

On a shared 2-core machine run it with OMP_NUM_THREADS=1: oversubscribed threads make every step
several times slower.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from edgeprune.engine.attribution import attribute, scored_circuit
from edgeprune.engine.circuit import Circuit
from edgeprune.engine.loading import load_model
from edgeprune.engine.masked import CircuitModel
from edgeprune.engine.metrics import evaluate_many
from edgeprune.engine.prune import PruneConfig, prune
from edgeprune.engine.sweep import MIB_SIZES, cmd, cpr
from edgeprune.engine.tasks import TaskDataset, build_task

RESULTS = Path(__file__).resolve().parent / "results"
SPARSITIES = (0.98, 0.99, 0.995)
TUNED = {"steps": 40, "edge_lr": 0.05, "node_lr": 0.05, "lambda_lr": 0.05,
         "warm_start_floor": 3.0, "lagrangian_scale": 1.0}
TUNED_IG = ("eap_ig_edges", 3)  # the warm start's scores: method and integration points
METRICS = ("kl", "faithfulness", "accuracy", "pairwise_accuracy")


def _env(name: str, default: str) -> str:
    return os.environ.get(f"EDGEPRUNE_BENCH_{name}", default)


def _emit(row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def _timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    n_train, n_test = int(_env("TRAIN", "32")), int(_env("TEST", "32"))
    batch = int(_env("BATCH", "8"))
    tasks = _env("TASKS", "ioi,gendered_pronoun").split(",")
    model_ref = _env("MODEL", "smollm2-135m")
    parts = set(_env("PARTS", "matched,sweep").split(","))
    start = time.perf_counter()
    model = load_model(model_ref)
    defaults = PruneConfig()
    settings = {"model": model_ref, "edges_total": model.graph.n_edges, "train": n_train,
                "test": n_test, "batch": batch, "threads": torch.get_num_threads(),
                "default_steps": defaults.steps, "default_lr": defaults.edge_lr,
                "tuned": TUNED, "tuned_warm_start": TUNED_IG,
                "note": "short CPU runs (paper: 3000 steps, batch 32, 200 IOI examples)"}
    _emit({"bench": "methods", "settings": settings})
    rows, sweeps = [], []
    for task in tasks:
        train = build_task(task, model.tokenizer, n=n_train, seed=0, split="train")
        test = build_task(task, model.tokenizer, n=n_test, seed=0, split="test")
        task_rows, task_sweeps = _task(model, task, train, test, batch, parts)
        rows += task_rows
        sweeps += task_sweeps
    total = time.perf_counter() - start
    _write(settings, rows, sweeps, total, _env("OUT", "methods"))
    _emit({"bench": "methods", "total_s": round(total, 1)})


def _task(model: CircuitModel, task: str, train: TaskDataset, test: TaskDataset,
          batch: int, parts: set[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    E = model.graph.n_edges
    scores, seconds = {}, {}
    for method in ("eap", "eap_ig"):
        scores[method], seconds[method] = _timed(lambda m=method: attribute(
            model, train, m, ig_steps=5, batch_size=batch))
    tuned_scores, tuned_ig_s = None, 0.0
    if "matched" in parts:
        tuned_scores, tuned_ig_s = _timed(lambda: attribute(
            model, train, TUNED_IG[0], ig_steps=TUNED_IG[1], batch_size=batch))

    circuits: list[tuple[str, float, Circuit, float, dict[str, Any]]] = []
    for sparsity in SPARSITIES if "matched" in parts else ():
        k = round((1 - sparsity) * E)
        for method in ("eap", "eap_ig"):
            circuits.append((method, sparsity, scored_circuit(
                model, train, scores[method], method=method, edge_count=k), seconds[method], {}))
        for name, config, warm, extra_s in (
            ("edge_pruning", PruneConfig(edge_sparsity=sparsity, batch_size=batch), scores["eap_ig"],
             seconds["eap_ig"]),
            ("edge_pruning_tuned", PruneConfig(edge_sparsity=sparsity, batch_size=batch, **TUNED),
             tuned_scores, tuned_ig_s),
        ):
            result, run_s = _timed(lambda c=config, w=warm: prune(model, train, c, warm_scores=w))
            circuits.append((name, sparsity, result.circuit, run_s + extra_s, {
                "reached_sparsity": round(result.reached_sparsity, 4),
                "warnings": [w.reason for w in result.warnings]}))
    metrics = evaluate_many(model, [c for _, _, c, _, _ in circuits], test,
                            batch_size=batch) if circuits else []
    rows = []
    for (method, sparsity, circuit, wall, extra), m in zip(circuits, metrics, strict=True):
        row = {"bench": "methods", "task": task, "method": method, "sparsity": sparsity,
               "edges": circuit.edge_count, **{k: m.get(k, math.nan) for k in METRICS},
               "wall_s": round(wall, 1), **extra}
        rows.append(row)
        _emit(row)

    # Sweeps over the MIB sizes: scored methods cut from their scores; Edge Pruning as the
    # service runs it, one default run at the sparsest size cut at every size.
    sweep_run, sweep_s = _timed(lambda: prune(
        model, train, PruneConfig(edge_count=max(1, round(MIB_SIZES[0] * E)), batch_size=batch),
        warm_scores=scores["eap_ig"]))
    sweeps = []
    for method in ("eap", "eap_ig", "edge_pruning"):
        made, cut_s = _timed(lambda m=method: [
            sweep_run.circuit_at(model, edge_count=round(size * E)) if m == "edge_pruning" else
            scored_circuit(model, train, scores[m], method=m, edge_count=round(size * E))
            for size in MIB_SIZES])
        results, eval_s = _timed(lambda c=made: evaluate_many(model, c, test, batch_size=batch))
        found_s = cut_s + (seconds["eap_ig"] + sweep_s if method == "edge_pruning"
                           else seconds[method])
        fractions = [c.edge_count / E for c in made]
        faithful = [r.get("faithfulness", math.nan) for r in results]
        row = {"bench": "methods", "task": task, "sweep": method, "sizes": list(MIB_SIZES),
               "faithfulness": [round(f, 4) for f in faithful], "cpr": cpr(fractions, faithful),
               "cmd": cmd(fractions, faithful), "discovery_s": round(found_s, 1),
               "evaluation_s": round(eval_s, 1), "wall_s": round(found_s + eval_s, 1)}
        sweeps.append(row)
        _emit(row)
    return rows, sweeps


def _write(settings: dict[str, Any], rows: list[dict[str, Any]], sweeps: list[dict[str, Any]],
           total: float, name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f"{name}.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in [{"settings": settings}, *rows, *sweeps])
    lines = [
        f"# Circuit discovery methods on {settings['model']}",
        "",
        ("Generated by `python -m bench methods` (bench/bench_methods.py); its docstring says what "
        "each method's settings are."),
        "",
        f"Settings: {json.dumps(settings)}. Total {total / 60:.1f} min.",
    ]
    for task in dict.fromkeys(r["task"] for r in [*rows, *sweeps]):
        lines += ["", f"## {task}", "", "Held-out metrics at matched sparsity:", "",
                  ("| method | sparsity | edges | KL | faithfulness | accuracy | pairwise acc. | "
                  "reached sparsity | warnings | wall s |"),
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted((r for r in rows if r["task"] == task),
                        key=lambda r: (r["sparsity"], r["method"])):
            lines.append("| " + " | ".join(_fmt(r.get(k, "")) for k in (
                "method", "sparsity", "edges", *METRICS, "reached_sparsity")) +
                f" | {', '.join(r.get('warnings', [])) or '-'} | {_fmt(r['wall_s'])} |")
        lines += ["", ("Sweeps over the MIB sizes (fraction of edges "
                  f"{', '.join(str(s) for s in MIB_SIZES)}):"), "",
                  ("| method | CPR (higher better) | CMD (lower better) | discovery s | "
                  "evaluation s | faithfulness per size |"), "|---|---|---|---|---|---|"]
        for s in (s for s in sweeps if s["task"] == task):
            lines.append(f"| {s['sweep']} | {s['cpr']:.4f} | {s['cmd']:.4f} | "
                         f"{s['discovery_s']:.1f} | {s['evaluation_s']:.1f} | "
                         f"{', '.join(_fmt(f) for f in s['faithfulness'])} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
