"""Masked forward + backward (w.r.t. the masks) against a plain HF fine-tuning step.

For each model shape (random weights of the real shapes; nothing is loaded) it measures, each in a
fresh subprocess so that peak memories are separable (VmHWM from /proc/self/status):

* ``masked``: one ``CircuitModel.logits`` forward at the last position with dense edge and node
  masks that require grad, the corrupted run precomputed (``ablated=``), KL to cached clean logits,
  backward to the masks;
* ``masked_checkpointed``: the same with activation checkpointing (only on request:
  ``python -m bench.bench_forward --measure gpt2-small masked_checkpointed``);
* ``hf``: one plain forward of the Hugging Face module (eval mode, weights requiring grad), the
  same KL at the last position, backward to the weights.

Prints one JSON line per measurement and, per shape, one with the time ratio masked / hf of the
best round of each.
Run: ``python -m bench forward`` (or ``python -m bench.bench_forward [shape ...]``).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

SHAPES = {
    # SmolLM2-135M: LlamaForCausalLM, 30 layers, 9 heads, 3 KV heads, tied embeddings
    "smollm2-135m": {
        "family": "llama",
        "batch": 16,
        "tokens": 24,
        "config": {
            "hidden_size": 576,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "intermediate_size": 1536,
            "vocab_size": 49152,
            "tie_word_embeddings": True,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
        },
    },
    # GPT-2 small: 12 layers, 12 heads, width 768
    "gpt2-small": {
        "family": "gpt2",
        "batch": 8,
        "tokens": 32,
        "config": {
            "n_layer": 12,
            "n_head": 12,
            "n_embd": 768,
            "vocab_size": 50257,
            "n_positions": 1024,
        },
    },
}
REPEATS = 3  # timed steps per process (after one warm-up step); the median is kept
RESULTS = Path(__file__).parent / "results" / "forward.jsonl"  # the last run's summaries
ROUNDS = 2  # processes per kind, alternating hf / masked
# BENCH_THREADS=n pins torch's thread count (on a shared, oversubscribed machine one thread gives
# far steadier figures than the default); 0 keeps torch's default.
THREADS = int(os.environ.get("BENCH_THREADS", "0"))


def build_module(spec: dict, *, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A randomly initialised model of a shape spec (``SHAPES``' form: family and config),
    made on ``device`` (a 1B-parameter model is not first built on the CPU) in ``dtype``."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config_class, model_class = ((GPT2Config, GPT2LMHeadModel) if spec["family"] == "gpt2"
                                 else (LlamaConfig, LlamaForCausalLM))
    with torch.device(device):
        module = model_class(config_class(**spec["config"]))
    return module.to(dtype).eval()


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _kl_last(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(clean || model) at the last position, in fp32: logits [B, V], target log-probs [B, V]."""
    return torch.nn.functional.kl_div(
        logits.float().log_softmax(-1), target, log_target=True, reduction="batchmean"
    )


def make_step(module: torch.nn.Module, kind: str, *, batch: int,
              tokens: int) -> tuple[Callable[[], None], Any]:
    """(one training step of ``kind`` on a batch of random tokens, the CircuitModel), on the
    module's device and in its dtype; the masks and the KL stay fp32 as in a pruning run."""
    from edgeprune.engine.masked import CircuitModel

    B, T = batch, tokens
    device = next(module.parameters()).device
    gen = torch.Generator().manual_seed(1)
    vocab = module.config.vocab_size
    ids = torch.randint(vocab, (B, T), generator=gen).to(device)
    corrupted = torch.randint(vocab, (B, T), generator=gen).to(device)
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    last = torch.full((B,), T - 1, device=device)
    model = CircuitModel(module)  # freezes the weights
    module.requires_grad_(kind == "hf")  # a fine-tune step trains them, the masked one the masks
    with torch.no_grad():
        target = model.reference_logits(ids, attention_mask=mask, positions=last).float()
        target = target.log_softmax(-1)  # [B, V]

    if kind in ("masked", "masked_checkpointed"):
        model.checkpoint_layers = kind == "masked_checkpointed"
        ablated = model.ablation_outputs(corrupted, attention_mask=mask)  # cached corrupted run
        edge = torch.rand(model.graph.n_edges, generator=gen).to(device).requires_grad_()
        node = torch.rand(model.graph.n_writers, generator=gen).to(device).requires_grad_()

        def step() -> None:
            out = model.logits(
                ids,
                attention_mask=mask,
                ablated=ablated,
                edge_mask=edge,
                node_mask=node,
                positions=last,
            )  # [B, V]
            _kl_last(out, target).backward()
            edge.grad = node.grad = None
    else:

        def step() -> None:
            out = module(input_ids=ids, attention_mask=mask).logits[:, -1]  # [B, V]
            _kl_last(out, target).backward()
            module.zero_grad(set_to_none=True)

    return step, model


def time_steps(step: Callable[[], None], repeats: int, device: torch.device | str) -> list[float]:
    """Seconds of ``repeats`` + 1 calls of ``step`` (the first a warm-up), waiting for the GPU."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats + 1):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return times


def measure(shape: str, kind: str) -> dict:
    """One measurement (run in its own process): median step time and peak memory."""
    if THREADS:
        torch.set_num_threads(THREADS)
    spec = SHAPES[shape]
    B, T = spec["batch"], spec["tokens"]
    step, model = make_step(build_module(spec), kind, batch=B, tokens=T)
    base_rss = _peak_rss_mb()
    times = time_steps(step, REPEATS, "cpu")
    return {
        "bench": "forward",
        "shape": shape,
        "kind": kind,
        "batch": B,
        "tokens": T,
        "seconds": round(statistics.median(times[1:]), 4),
        "seconds_min": round(min(times[1:]), 4),
        "peak_mb": round(_peak_rss_mb(), 1),
        "peak_before_steps_mb": round(base_rss, 1),
        "threads": torch.get_num_threads(),
        "edges": model.graph.n_edges,
    }


def _measure_in_subprocess(shape: str, kind: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "bench.bench_forward", "--measure", shape, kind],
        check=True,
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--measure"]:
        print(json.dumps(measure(argv[1], argv[2])), flush=True)
        return
    shapes = [a for a in argv if a in SHAPES] or list(SHAPES)
    lines: list[dict] = []
    for shape in shapes:
        # alternate the two kinds so that both see the same machine load; keep each kind's best round
        best: dict[str, dict] = {}
        for _ in range(ROUNDS):
            for kind in ("hf", "masked"):
                result = _measure_in_subprocess(shape, kind)
                print(json.dumps(result), flush=True)
                if kind not in best or result["seconds"] < best[kind]["seconds"]:
                    best[kind] = result
        summary = {
            "bench": "forward",
            "shape": shape,
            "kind": "ratio",
            "threads": best["hf"]["threads"],
            "hf_seconds": best["hf"]["seconds"],
            "masked_seconds": best["masked"]["seconds"],
            "time_ratio": round(best["masked"]["seconds"] / best["hf"]["seconds"], 3),
            "peak_mb_masked": best["masked"]["peak_mb"],
            "peak_mb_hf": best["hf"]["peak_mb"],
        }
        print(json.dumps(summary), flush=True)
        lines.append(summary)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text("".join(json.dumps(line) + "\n" for line in lines))


if __name__ == "__main__":
    main()
