"""Which models of each supported family fit one 80 GB GPU: the memory estimate of a pruning job
(``engine.memory.estimate_job_memory``, batch 8 x 64 tokens) for the smallest and the largest
published model of every family, from their config.json values typed in below (nothing is
downloaded). Pure arithmetic; writes bench/results/families.md, whose table docs/operations.md
shows.

    python -m bench families
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgeprune.engine.errors import ResourceExhausted
from edgeprune.engine.memory import ModelShape, check_fits, estimate_job_memory

GPU_BYTES = 80 * 10**9
BATCH, SEQ = 8, 64
GiB = 2**30
RESULTS = Path(__file__).resolve().parent / "results" / "families.md"

# (model, the config.json fields the memory model reads), smallest then largest of each family,
# as published with the checkpoints; add a family's pair here when it gains an adapter.
MODELS: list[tuple[str, dict[str, Any]]] = [
    ("GPT-2 small", {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12,
                     "vocab_size": 50257, "n_positions": 1024}),
    ("GPT-2 XL", {"model_type": "gpt2", "n_embd": 1600, "n_layer": 48, "n_head": 25,
                  "vocab_size": 50257, "n_positions": 1024}),
    ("SmolLM2-135M", {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30,
                      "num_attention_heads": 9, "num_key_value_heads": 3,
                      "intermediate_size": 1536, "vocab_size": 49152,
                      "tie_word_embeddings": True}),
    ("Llama-3.2-1B", {"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16,
                      "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                      "intermediate_size": 8192, "vocab_size": 128256,
                      "tie_word_embeddings": True}),
    ("Llama-3.1-70B", {"model_type": "llama", "hidden_size": 8192, "num_hidden_layers": 80,
                       "num_attention_heads": 64, "num_key_value_heads": 8,
                       "intermediate_size": 28672, "vocab_size": 128256,
                       "tie_word_embeddings": False}),
    ("Qwen2.5-0.5B", {"model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24,
                      "num_attention_heads": 14, "num_key_value_heads": 2,
                      "intermediate_size": 4864, "vocab_size": 151936,
                      "tie_word_embeddings": True}),
    ("Qwen2.5-72B", {"model_type": "qwen2", "hidden_size": 8192, "num_hidden_layers": 80,
                     "num_attention_heads": 64, "num_key_value_heads": 8,
                     "intermediate_size": 29568, "vocab_size": 152064,
                     "tie_word_embeddings": False}),
    ("Mistral-7B", {"model_type": "mistral", "hidden_size": 4096, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 8,
                    "intermediate_size": 14336, "vocab_size": 32000,
                    "tie_word_embeddings": False}),
    ("Pythia-70M", {"model_type": "gpt_neox", "hidden_size": 512, "num_hidden_layers": 6,
                    "num_attention_heads": 8, "intermediate_size": 2048, "vocab_size": 50304,
                    "rotary_pct": 0.25, "use_parallel_residual": True,
                    "tie_word_embeddings": False}),
    ("Pythia-12B", {"model_type": "gpt_neox", "hidden_size": 5120, "num_hidden_layers": 36,
                    "num_attention_heads": 40, "intermediate_size": 20480, "vocab_size": 50688,
                    "rotary_pct": 0.25, "use_parallel_residual": True,
                    "tie_word_embeddings": False}),
    ("Qwen3-0.6B", {"model_type": "qwen3", "hidden_size": 1024, "num_hidden_layers": 28,
                    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
                    "intermediate_size": 3072, "vocab_size": 151936,
                    "tie_word_embeddings": True}),
    ("Qwen3-32B", {"model_type": "qwen3", "hidden_size": 5120, "num_hidden_layers": 64,
                   "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128,
                   "intermediate_size": 25600, "vocab_size": 151936,
                   "tie_word_embeddings": False}),
    ("Phi-3-mini-4k", {"model_type": "phi3", "hidden_size": 3072, "num_hidden_layers": 32,
                       "num_attention_heads": 32, "num_key_value_heads": 32,
                       "intermediate_size": 8192, "vocab_size": 32064,
                       "tie_word_embeddings": False}),
    ("Phi-4", {"model_type": "phi3", "hidden_size": 5120, "num_hidden_layers": 40,
               "num_attention_heads": 40, "num_key_value_heads": 10, "intermediate_size": 17920,
               "vocab_size": 100352, "tie_word_embeddings": False}),
    ("OLMo-1B", {"model_type": "olmo", "hidden_size": 2048, "num_hidden_layers": 16,
                 "num_attention_heads": 16, "num_key_value_heads": 16, "intermediate_size": 8192,
                 "vocab_size": 50304, "tie_word_embeddings": True}),
    ("OLMo-7B", {"model_type": "olmo", "hidden_size": 4096, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 32, "intermediate_size": 11008,
                 "vocab_size": 50304, "tie_word_embeddings": False}),
    ("OLMo-2-1B", {"model_type": "olmo2", "hidden_size": 2048, "num_hidden_layers": 16,
                   "num_attention_heads": 16, "num_key_value_heads": 16,
                   "intermediate_size": 8192, "vocab_size": 100352,
                   "tie_word_embeddings": False}),
    ("OLMo-2-32B", {"model_type": "olmo2", "hidden_size": 5120, "num_hidden_layers": 64,
                    "num_attention_heads": 40, "num_key_value_heads": 8,
                    "intermediate_size": 27648, "vocab_size": 100352,
                    "tie_word_embeddings": False}),
    # Gemma's config.json leaves tie_word_embeddings out (tied, the family's default)
    ("Gemma-2B", {"model_type": "gemma", "hidden_size": 2048, "num_hidden_layers": 18,
                  "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256,
                  "intermediate_size": 16384, "vocab_size": 256000}),
    ("Gemma-7B", {"model_type": "gemma", "hidden_size": 3072, "num_hidden_layers": 28,
                  "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 256,
                  "intermediate_size": 24576, "vocab_size": 256000}),
    ("Gemma-2-2B", {"model_type": "gemma2", "hidden_size": 2304, "num_hidden_layers": 26,
                    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                    "intermediate_size": 9216, "vocab_size": 256000,
                    "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}),
    ("Gemma-2-27B", {"model_type": "gemma2", "hidden_size": 4608, "num_hidden_layers": 46,
                     "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 128,
                     "intermediate_size": 36864, "vocab_size": 256000,
                     "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}),
]

# The settings tried in order, the first that fits named in the table.
SETTINGS = [("fp32", "float32", False), ("bf16", "bfloat16", False),
            ("bf16 + checkpointing", "bfloat16", True)]


def _fits(shape: ModelShape, dtype: str, checkpointing: bool, batch: int = BATCH) -> bool:
    estimate = estimate_job_memory(shape, batch_size=batch, seq_len=SEQ, dtype=dtype,
                                   activation_checkpointing=checkpointing)
    try:
        check_fits(estimate, GPU_BYTES)
    except ResourceExhausted:
        return False
    return True


def _verdict(shape: ModelShape) -> str:
    for label, dtype, checkpointing in SETTINGS:
        if _fits(shape, dtype, checkpointing):
            return label
    batch = BATCH
    while batch > 1 and not _fits(shape, "bfloat16", True, batch):
        batch //= 2
    if _fits(shape, "bfloat16", True, batch):
        return f"bf16 + checkpointing at batch {batch} only"
    # data parallel ranks split the batch, not the weights: more GPUs do not help here
    return f"no (its bf16 weights alone take {shape.n_params * 2 / GiB:.1f} GiB)"


def rows() -> list[dict[str, Any]]:
    """One row per model: its graph's size, the estimates and the verdict."""
    out = []
    for name, config in MODELS:
        shape = ModelShape.from_config(config, name=name)
        gib = {label: estimate_job_memory(shape, batch_size=BATCH, seq_len=SEQ, dtype=dtype,
                                          activation_checkpointing=ckpt).total / GiB
               for label, dtype, ckpt in SETTINGS}
        out.append({"model": name, "model_type": config["model_type"],
                    "params": shape.n_params, "params_b": round(shape.n_params / 1e9, 2),
                    "writers": shape.n_writers,
                    "edges": shape.n_edges, **{f"{k} GiB": round(v, 1) for k, v in gib.items()},
                    "fits 80 GB": _verdict(shape)})
    return out


def table(results: list[dict[str, Any]]) -> str:
    """The markdown table of ``rows()``."""
    header = ["model", "model_type", "parameters", "writers", "edges", "fp32", "bf16",
              "bf16 + checkpointing", "fits 80 GB"]
    lines = ["| " + " | ".join(header) + " |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        cells = [r["model"], f'`{r["model_type"]}`', _count(r["params"]), f'{r["writers"]:,}',
                 f'{r["edges"]:,}', f'{r["fp32 GiB"]} GiB', f'{r["bf16 GiB"]} GiB',
                 f'{r["bf16 + checkpointing GiB"]} GiB', r["fits 80 GB"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _count(params: int) -> str:
    return f"{params / 1e9:.2f} B" if params >= 1e9 else f"{params / 1e6:.0f} M"


def page(results: list[dict[str, Any]]) -> str:
    return (
        "# Model families on one 80 GB GPU (`python -m bench families`)\n\n"
        f"Estimated peak of one pruning step, batch {BATCH} x {SEQ} tokens, against the 90 % of "
        "80 GB that `check_fits` allows; the last column names the first setting that fits "
        "(fp32, bf16, bf16 with activation checkpointing), else the largest batch that does. "
        "Shapes from the models' published config.json values (bench/bench_families.py).\n\n"
        + table(results)
    )


def main() -> None:
    results = rows()
    for r in results:
        print(json.dumps({"bench": "families", **r}), flush=True)
    RESULTS.write_text(page(results))


if __name__ == "__main__":
    main()
