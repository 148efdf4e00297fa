"""Peak memory of a pruning job: the estimate (engine/memory.py) against a measurement.

Each measurement runs in a fresh process with glibc's mmap threshold fixed, so that freed tensors
leave the resident set at once and its peak (VmHWM) follows the live tensors. The measured figure
is the peak resident set during ``prune`` (two steps, random weights of the given shape) minus the
resident set of the warmed-up interpreter before the model was built.

    python -m bench memory                       # the calibration table, JSON lines
    python -m bench.bench_memory --measure '{"preset": "gpt2-small", "batch": 8, "seq": 32}'
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from edgeprune.engine.memory import (
    PRESETS,
    ModelShape,
    estimate_evaluation_memory,
    estimate_job_memory,
    track_peak_memory,
)
from edgeprune.engine.prune import PruneConfig

# (shape, batch, tokens) measured by main(): the real shapes of GPT-2 small and SmolLM2-135M.
CASES: list[dict[str, Any]] = [
    {"preset": "gpt2-small", "batch": 8, "seq": 32},
    {"preset": "smollm2-135m", "batch": 8, "seq": 24},
]
# measured by main() as an evaluation (metrics.evaluate_many of one circuit; no gradients)
EVALUATION_CASES: list[dict[str, Any]] = [
    {"preset": "gpt2-small", "batch": 32, "seq": 32, "examples": 64, "evaluate": True},
    {"preset": "smollm2-135m", "batch": 32, "seq": 24, "examples": 64, "evaluate": True},
]
# measured by main() with and without activation checkpointing
CHECKPOINTING_CASE: dict[str, Any] = {"preset": "gpt2-small", "batch": 8, "seq": 64}


def random_model(shape: ModelShape, dtype: torch.dtype = torch.float32) -> Any:
    """A randomly initialised Hugging Face model of ``shape`` wrapped in a CircuitModel."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from edgeprune.engine.masked import CircuitModel

    torch.manual_seed(0)
    if shape.gated_mlp:
        config = LlamaConfig(
            vocab_size=shape.vocab_size,
            hidden_size=shape.d_model,
            intermediate_size=shape.d_ff,
            num_hidden_layers=shape.n_layers,
            num_attention_heads=shape.n_heads,
            num_key_value_heads=shape.n_kv_heads,
            head_dim=shape.head_dim,
            tie_word_embeddings=shape.tied_embeddings,
            max_position_embeddings=2048,
        )
        module = LlamaForCausalLM(config)
    else:
        config = GPT2Config(
            vocab_size=shape.vocab_size,
            n_embd=shape.d_model,
            n_inner=shape.d_ff,
            n_layer=shape.n_layers,
            n_head=shape.n_heads,
            n_positions=max(shape.n_positions, 64),
        )
        module = GPT2LMHeadModel(config)
    return CircuitModel(module.to(dtype), None, name=shape.name)


def random_dataset(vocab_size: int, n: int, seq_len: int, seed: int = 0) -> Any:
    """``n`` examples of ``seq_len`` random token ids, answer at the last position."""
    from edgeprune.engine.tasks.base import Example, from_examples

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (2, n, seq_len + 2), generator=g).tolist()
    examples = [
        Example(clean=c[:seq_len], corrupted=k[:seq_len], target=c[seq_len], distractor=k[seq_len])
        for c, k in zip(ids[0], ids[1])
    ]
    return from_examples(examples, None, name="random", vocab_size=vocab_size)


def _prune_steps(
    model: Any, dataset: Any, batch: int, steps: int, checkpointing: bool = False
) -> None:
    from edgeprune.engine.prune import PruneConfig, prune

    config = PruneConfig(
        steps=steps, batch_size=batch, seed=0, activation_checkpointing=checkpointing
    )
    prune(model, dataset, config)


def _evaluate(model: Any, dataset: Any, batch: int) -> None:
    from edgeprune.engine.metrics import evaluate_many

    g = torch.Generator().manual_seed(0)
    edges = torch.rand(model.graph.n_edges, generator=g) < 0.1  # a random circuit
    evaluate_many(model, [(edges.float(), None)], dataset, batch_size=batch)


def measure(case: dict[str, Any]) -> dict[str, Any]:
    """Run in *this* process: measured peak of two pruning steps and the estimate, in bytes.

    ``case``: "preset" (a name in PRESETS) or "shape" (ModelShape fields), "batch", "seq",
    optional "examples" (default: batch; all are cached, as prune does within its budget),
    "dtype" (default "float32") and "activation_checkpointing" (default false); with
    "evaluate" true, an evaluation of one random circuit on the examples instead (and
    :func:`estimate_evaluation_memory`).
    """
    shape = PRESETS[case["preset"]] if "preset" in case else ModelShape(**case["shape"])
    batch, seq = int(case["batch"]), int(case["seq"])
    examples = int(case.get("examples", batch))
    dtype = case.get("dtype", "float32")
    checkpointing = bool(case.get("activation_checkpointing", False))
    # warm up: load every library and kernel a pruning step touches, then take the baseline
    tiny = ModelShape(
        1,
        2,
        2 if not shape.gated_mlp else 1,
        8,
        16,
        32,
        has_pos=not shape.gated_mlp,
        n_positions=64,
        gated_mlp=shape.gated_mlp,
        name="warmup",
    )
    _prune_steps(random_model(tiny), random_dataset(32, 2, 4), 2, 1)
    with track_peak_memory("cpu") as base:
        pass
    evaluate = bool(case.get("evaluate", False))
    with track_peak_memory("cpu") as peak:
        model = random_model(shape, getattr(torch, dtype))
        dataset = random_dataset(shape.vocab_size, examples, seq)
        if evaluate:
            _evaluate(model, dataset, batch)
        else:
            _prune_steps(model, dataset, batch, 2, checkpointing)
    if evaluate:
        estimate = estimate_evaluation_memory(
            shape, batch_size=batch, seq_len=seq, n_examples=examples, dtype=dtype
        )
    else:
        estimate = estimate_job_memory(
            shape,
            batch_size=batch,
            seq_len=seq,
            n_examples=examples,
            dtype=dtype,
            activation_checkpointing=checkpointing,
            warm_start=PruneConfig().warm_start is not None,  # _prune_steps runs the default
        )
    return {
        "evaluate": evaluate,
        "model": shape.name,
        "batch": batch,
        "seq": seq,
        "examples": examples,
        "dtype": dtype,
        "activation_checkpointing": checkpointing,
        "measured_bytes": peak.peak - base.start,
        "estimate_bytes": estimate.total,
        "estimate": estimate.terms(),
    }


def measure_in_subprocess(case: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    """:func:`measure` in a fresh interpreter with a fixed mmap threshold (see the module doc)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="2")
    out = subprocess.run(
        [sys.executable, "-m", "bench.bench_memory", "--measure", json.dumps(case)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    if out.returncode != 0:
        raise RuntimeError(f"measurement failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    for case in CASES:
        result = measure_in_subprocess(case)
        result["ratio"] = round(result["estimate_bytes"] / result["measured_bytes"], 3)
        print(json.dumps({"bench": "memory", **result}), flush=True)
    for case in EVALUATION_CASES:
        result = measure_in_subprocess(case)
        result["ratio"] = round(result["estimate_bytes"] / result["measured_bytes"], 3)
        print(json.dumps({"bench": "memory_evaluation", **result}), flush=True)
    plain, checkpointed = (
        measure_in_subprocess({**CHECKPOINTING_CASE, "activation_checkpointing": on})
        for on in (False, True)
    )
    print(
        json.dumps(
            {
                "bench": "memory_checkpointing",
                **CHECKPOINTING_CASE,
                "measured_mib": round(plain["measured_bytes"] / 2**20, 1),
                "checkpointed_mib": round(checkpointed["measured_bytes"] / 2**20, 1),
                "ratio": round(checkpointed["measured_bytes"] / plain["measured_bytes"], 3),
                "estimate_mib": round(plain["estimate_bytes"] / 2**20, 1),
                "checkpointed_estimate_mib": round(checkpointed["estimate_bytes"] / 2**20, 1),
            }
        ),
        flush=True,
    )
    for name in PRESETS:
        for dtype, ckpt in (("float32", False), ("bfloat16", False), ("bfloat16", True)):
            est = estimate_job_memory(
                name, batch_size=8, seq_len=64, dtype=dtype, activation_checkpointing=ckpt
            )
            print(
                json.dumps(
                    {
                        "bench": "memory_estimate",
                        "model": name,
                        "batch": 8,
                        "seq": 64,
                        "dtype": dtype,
                        "activation_checkpointing": ckpt,
                        "gib": round(est.total / 2**30, 2),
                        "terms_gib": {k: round(v / 2**30, 2) for k, v in est.terms().items()},
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", help="one case as JSON; prints its measurement")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
    else:
        main()
