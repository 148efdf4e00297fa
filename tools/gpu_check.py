"""`make gpu-check`: what a CUDA machine must show before the GPU deployment is trusted, in one
JSON report (bench/results/gpu-check.json, or --out).

1. **tests**: the engine tests marked ``device`` (bf16 and fp32 masked forwards against the
   model, mask gradients in bf16 against fp32, activation checkpointing, pruning steps) run on
   ``cuda`` through $EDGEPRUNE_TEST_DEVICE, in a pytest subprocess;
2. **steps**: a masked pruning step against a plain Hugging Face fine-tune step (bench/
   bench_forward.py's steps and shapes) in float32 and bfloat16, with their peak memory;
3. **largest batch**: the largest batch of a masked step on a 1B-class model (Llama-3.2-1B's
   published sizes, random weights) in bfloat16 whose peak allocated memory stays within a cap
   (default: the GPU overlay's worker_memory_bytes), found by doubling, then bisecting; each
   probe also records the engine's estimate of a pruning step at that batch.

Each part has a time budget (BUDGET_S; about 5 minutes in all on an H100) and stops early when
it is spent, saying so in the report. ``--dry-run`` runs the same code on the CPU with tiny
shapes in seconds (a test runs it, so the script cannot rot unnoticed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python tools/gpu_check.py` from the Makefile
    sys.path.insert(0, str(ROOT))

from bench.bench_forward import SHAPES, build_module, make_step, time_steps
from edgeprune.engine.memory import ModelShape, estimate_job_memory, track_peak_memory

DEFAULT_OUT = ROOT / "bench" / "results" / "gpu-check.json"
DEFAULT_CAP_BYTES = 80_000_000_000  # deploy/overlays/gpu/config.yaml's worker_memory_bytes
BUDGET_S = {"tests": 180.0, "steps": 60.0, "largest_batch": 90.0}
REPEATS = 3  # timed steps per measurement, after one warm-up
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Llama-3.2-1B's published config (meta-llama/Llama-3.2-1B, config.json), typed in: nothing is
# downloaded; the weights are random.
LLAMA_1B = {
    "family": "llama",
    "tokens": 32,
    "config": {
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "intermediate_size": 8192,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
    },
}
MAX_BATCH = 1024  # the engine's and the overlay's ceiling on a job's batch

# --dry-run: the same paths on tiny shapes
TINY_LLAMA = {"family": "llama", "batch": 2, "tokens": 8, "config": {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "intermediate_size": 48, "vocab_size": 64, "max_position_embeddings": 64}}
TINY_GPT2 = {"family": "gpt2", "batch": 2, "tokens": 8, "config": {
    "n_layer": 2, "n_head": 4, "n_embd": 32, "vocab_size": 64, "n_positions": 64,
    "bos_token_id": 0, "eos_token_id": 0}}
DRY_RUN_CAP_BYTES = 64 << 20
DRY_RUN_MAX_BATCH = 8

# The files of the `device`-marked tests (collecting only them keeps pytest's start short).
DEVICE_TESTS = ["tests/engine/test_masked_bf16.py", "tests/engine/test_masked_checkpoint.py"]
# --dry-run: one quick device test
DRY_RUN_TESTS = [("tests/engine/test_masked_checkpoint.py::"
                  "test_checkpointing_in_bf16_keeps_mask_gradients")]


# ---- 1. tests ------------------------------------------------------------------------------


def run_tests(device: str, budget_s: float, tests: list[str]) -> dict[str, Any]:
    """The ``device``-marked engine tests on ``device``: counts from pytest's JUnit report."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "device",
                   f"--junitxml={report}", *tests]
        start = time.perf_counter()
        try:
            out = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True,
                                 timeout=budget_s, env={**os.environ,
                                                        "EDGEPRUNE_TEST_DEVICE": device})
        except subprocess.TimeoutExpired:
            return {"device": device, "ok": False, "timed_out": True, "budget_s": budget_s}
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        if report.exists():
            suite = ElementTree.parse(report).getroot()
            suite = suite if suite.tag == "testsuite" else suite[0]
            counts = {k: int(suite.get(k, 0)) for k in counts}
    failed = [line for line in out.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return {"device": device, "ok": out.returncode == 0 and counts["tests"] > 0, **counts,
            "returncode": out.returncode, "failed": failed[:20],
            "seconds": round(time.perf_counter() - start, 1)}


# ---- 2. masked step against a fine-tune step -------------------------------------------------


def measure_step(module: torch.nn.Module, kind: str, *, batch: int, tokens: int,
                 repeats: int = REPEATS) -> dict[str, Any]:
    """Median seconds and peak bytes of one step of ``kind`` (the step's own increase on the CPU,
    everything allocated on a GPU, weights included)."""
    device = next(module.parameters()).device
    step, _ = make_step(module, kind, batch=batch, tokens=tokens)
    with track_peak_memory(device) as peak:
        times = time_steps(step, repeats, device)
    return {"kind": kind, "batch": batch, "tokens": tokens,
            "seconds": round(statistics.median(times[1:]), 5),
            "peak_bytes": peak.peak if device.type == "cuda" else peak.increase}


def compare_steps(shapes: dict[str, dict], device: str, budget_s: float,
                  repeats: int = REPEATS) -> dict[str, Any]:
    """Each shape in each dtype: the masked step and the fine-tune step, and their time ratio."""
    deadline = time.monotonic() + budget_s
    steps, ratios = [], []
    for name, spec in shapes.items():
        for dtype_name, dtype in DTYPES.items():
            if time.monotonic() > deadline:
                return {"steps": steps, "ratios": ratios, "stopped": "time budget spent"}
            module = build_module(spec, device=device, dtype=dtype)
            pair = {kind: {"shape": name, "dtype": dtype_name,
                           **measure_step(module, kind, batch=spec["batch"],
                                          tokens=spec["tokens"], repeats=repeats)}
                    for kind in ("hf", "masked")}
            steps += pair.values()
            ratios.append({"shape": name, "dtype": dtype_name,
                           "hf_seconds": pair["hf"]["seconds"],
                           "masked_seconds": pair["masked"]["seconds"],
                           "time_ratio": round(pair["masked"]["seconds"]
                                               / max(pair["hf"]["seconds"], 1e-9), 3)})
            del module
            _free(device)
    return {"steps": steps, "ratios": ratios, "stopped": None}


# ---- 3. largest batch within a memory cap ----------------------------------------------------


def _free(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def probe(module: torch.nn.Module, batch: int, tokens: int, cap_bytes: int) -> dict[str, Any]:
    """One masked step at ``batch``: whether it ran within ``cap_bytes``, and the estimate."""
    device = next(module.parameters()).device
    estimate = estimate_job_memory(ModelShape.from_config(module.config), batch_size=batch,
                                   seq_len=tokens, dtype=next(module.parameters()).dtype)
    try:
        result = measure_step(module, "masked", batch=batch, tokens=tokens, repeats=1)
        fits = result["peak_bytes"] <= cap_bytes
    except torch.cuda.OutOfMemoryError:
        result, fits = {"batch": batch, "peak_bytes": None, "out_of_memory": True}, False
    finally:
        _free(str(device))
    return {**result, "fits": fits, "estimate_bytes": estimate.total}


def search_largest(fits: Callable[[int], bool], max_batch: int,
                   deadline: float) -> tuple[int, str]:
    """(the largest batch for which ``fits``, what stopped the search: "memory", "max_batch" or
    "time"): doubling from 1 while batches fit, then bisecting between the last fit and the
    first miss; 0 when not even 1 fits."""
    fit, miss, batch = 0, None, 1
    while miss is None:
        if time.monotonic() > deadline:
            return fit, "time"
        if not fits(batch):
            miss = batch
        elif batch == max_batch:
            return batch, "max_batch"
        else:
            fit, batch = batch, min(2 * batch, max_batch)
    while miss - fit > 1:
        if time.monotonic() > deadline:
            return fit, "time"
        middle = (fit + miss) // 2
        if fits(middle):
            fit = middle
        else:
            miss = middle
    return fit, "memory"


def largest_batch(name: str, spec: dict, device: str, dtype: torch.dtype, cap_bytes: int,
                  max_batch: int, budget_s: float) -> dict[str, Any]:
    """The largest batch of a masked step on ``spec`` whose peak stays within ``cap_bytes``."""
    module = build_module(spec, device=device, dtype=dtype)
    probes: list[dict[str, Any]] = []

    def fits(batch: int) -> bool:
        probes.append(probe(module, batch, spec["tokens"], cap_bytes))
        return probes[-1]["fits"]

    largest, limited_by = search_largest(fits, max_batch, time.monotonic() + budget_s)
    return {"shape": name, "dtype": str(dtype).removeprefix("torch."), "tokens": spec["tokens"],
            "cap_bytes": cap_bytes, "largest_batch": largest, "limited_by": limited_by,
            "probes": probes}


# ---- the report ----------------------------------------------------------------------------


def check(*, dry_run: bool, cap_bytes: int) -> dict[str, Any]:
    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here (use --dry-run to try the script on the "
                         "CPU)")
    device = "cpu" if dry_run else "cuda"
    started = time.perf_counter()
    report: dict[str, Any] = {
        "dry_run": dry_run,
        "device": device,
        "device_name": (platform.processor() or "cpu") if dry_run
        else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "budget_s": BUDGET_S,
    }
    report["tests"] = run_tests(device, BUDGET_S["tests"],
                                DRY_RUN_TESTS if dry_run else DEVICE_TESTS)
    shapes = {"tiny-llama": TINY_LLAMA, "tiny-gpt2": TINY_GPT2} if dry_run else SHAPES
    report.update(compare_steps(shapes, device, BUDGET_S["steps"], 1 if dry_run else REPEATS))
    if dry_run:
        search = ("tiny-llama", TINY_LLAMA, DRY_RUN_CAP_BYTES, DRY_RUN_MAX_BATCH)
    else:
        search = ("llama-3.2-1b", LLAMA_1B, cap_bytes, MAX_BATCH)
    name, spec, cap, most = search
    report["largest_batch"] = largest_batch(name, spec, device, torch.bfloat16, cap, most,
                                            BUDGET_S["largest_batch"])
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["ok"] = report["tests"]["ok"]
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="run every part on the CPU with tiny shapes (seconds)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSON report")
    parser.add_argument("--memory-cap-bytes", type=int, default=DEFAULT_CAP_BYTES,
                        help="the largest-batch search's cap on peak allocated GPU memory")
    args = parser.parse_args(argv)
    report = check(dry_run=args.dry_run, cap_bytes=args.memory_cap_bytes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("ok", "device_name", "seconds")}
                     | {"ratios": report["ratios"],
                        "largest_batch": report["largest_batch"]["largest_batch"],
                        "report": str(args.out)}))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
