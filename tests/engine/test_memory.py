"""The memory estimate of a pruning job: counts, scaling, errors, and calibration against a peak."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from bench.bench_memory import measure_in_subprocess
from edgeprune.engine._kernels import GRAD_M_ROWS
from edgeprune.engine.errors import InvalidArgument, ResourceExhausted
from edgeprune.engine.graph import Graph
from edgeprune.engine.loading import load_model
from edgeprune.engine.masked import block_layers
from edgeprune.engine.memory import (
    CALIBRATION_TOLERANCE,
    PRESETS,
    ModelShape,
    check_fits,
    estimate_evaluation_memory,
    estimate_job_memory,
    track_peak_memory,
)

GiB = 1024**3


@pytest.mark.parametrize(
    ("layers", "heads", "kv", "pos", "parallel"),
    [(2, 4, 4, True, False), (3, 6, 2, False, False), (12, 12, 12, True, False),
     (3, 4, 4, False, True)],
)
def test_writer_and_edge_counts_match_the_graph(
    layers: int, heads: int, kv: int, pos: bool, parallel: bool
) -> None:
    shape = ModelShape(layers, heads, kv, 64, 128, 100, has_pos=pos, parallel_attn_mlp=parallel)
    graph = Graph.build(layers, heads, kv, pos, parallel_attn_mlp=parallel)
    assert (shape.n_writers, shape.n_edges) == (graph.n_writers, graph.n_edges)
    # parallel attention and MLP (GPT-NeoX): no edges from a layer's heads into its MLP
    assert graph.parallel_attn_mlp == parallel
    sequential = Graph.build(layers, heads, kv, pos)
    assert sequential.n_edges - graph.n_edges == (layers * heads if parallel else 0)


def test_gemma2_and_gpt_neox_config_readers() -> None:
    """Gemma-2's soft-capped attention keeps its scores [B, H, T, T] and its post-attention norm
    the heads' outputs [H, B, T, D], per layer; Pythia's graph has parallel attention and MLP."""
    gemma2 = {"model_type": "gemma2", "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "hidden_size": 32, "intermediate_size": 64,
              "vocab_size": 100, "head_dim": 16}
    shape = ModelShape.from_config(gemma2)
    assert shape.post_norms and shape.attn_softcap and shape.tied_embeddings
    uncapped = ModelShape.from_config({**gemma2, "attn_logit_softcapping": None})
    assert not uncapped.attn_softcap and uncapped.n_params == shape.n_params
    B, T, s = 2, 8, 4
    plain = replace(shape, post_norms=False, attn_softcap=False)
    extra = (estimate_job_memory(shape, batch_size=B, seq_len=T).activations
             - estimate_job_memory(plain, batch_size=B, seq_len=T).activations)
    assert extra == 2 * (3 * B * 4 * T * T * s + 4 * B * T * 32 * s)  # 2 layers
    neox = ModelShape.from_config({"model_type": "gpt_neox", "num_hidden_layers": 2,
                                   "num_attention_heads": 4, "hidden_size": 32,
                                   "intermediate_size": 64, "vocab_size": 100})
    assert neox.parallel_attn_mlp and not neox.tied_embeddings and not neox.gated_mlp
    assert neox.n_edges == Graph.build(2, 4, 4, False, parallel_attn_mlp=True).n_edges


def test_documented_graph_sizes() -> None:
    assert PRESETS["gpt2-small"].n_edges == 32_936
    assert PRESETS["smollm2-135m"].n_writers == 301
    assert PRESETS["smollm2-135m"].n_edges == 70_651


@pytest.mark.parametrize("fixture", ["tiny_gpt2_dir", "tiny_llama_dir"])
def test_parameter_count_and_config_sources_agree(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    folder: Path = request.getfixturevalue(fixture)
    model = load_model(f"hf:{folder}")
    from_model = ModelShape.from_model(model)
    assert from_model.n_params == sum(p.numel() for p in model.module.parameters())
    assert ModelShape.from_config_file(folder) == ModelShape.from_config_file(
        folder / "config.json"
    )
    from_hf = ModelShape.from_config(AutoConfig.from_pretrained(folder, local_files_only=True))
    assert from_hf.n_params == from_model.n_params
    assert (
        estimate_job_memory(model, batch_size=2, seq_len=8).total
        == estimate_job_memory(from_hf, batch_size=2, seq_len=8).total
    )


def test_published_parameter_counts() -> None:
    expected = {
        "gpt2-small": 124.4e6,
        "smollm2-135m": 134.5e6,
        "llama-2-7b": 6.74e9,
        "codellama-13b": 13.0e9,
    }
    for name, count in expected.items():
        assert PRESETS[name].n_params == pytest.approx(count, rel=0.01), name


def test_estimate_scales_with_dtype_checkpointing_batch_and_ranks() -> None:
    base = estimate_job_memory("llama-2-7b", batch_size=8, seq_len=64)
    bf16 = estimate_job_memory("llama-2-7b", batch_size=8, seq_len=64, dtype="bf16")
    assert bf16.weights * 2 == base.weights and bf16.deltas * 2 == base.deltas
    ckpt = estimate_job_memory(
        "llama-2-7b", batch_size=8, seq_len=64, dtype="bf16", activation_checkpointing=True
    )
    layers = PRESETS["llama-2-7b"].n_layers
    # every layer's checkpoint inputs are kept (bf16, where the norms save fp32 without
    # checkpointing), the recomputed internals of one layer at a time
    assert bf16.activations / layers < ckpt.activations < bf16.activations
    assert ckpt.total < bf16.total < base.total
    double = estimate_job_memory("llama-2-7b", batch_size=16, seq_len=64)
    assert double.deltas == 2 * base.deltas and double.weights == base.weights
    split = estimate_job_memory("llama-2-7b", batch_size=16, seq_len=64, world_size=2)
    assert split.total == base.total, "each of 2 ranks holds half of the batch"
    # an EAP-IG warm start adds a few [W, B, T, D] to the peak, with or without checkpointing
    warm = estimate_job_memory("llama-2-7b", batch_size=8, seq_len=64, dtype="bf16",
                               activation_checkpointing=True, warm_start=True)
    assert warm.warm_start == int(3.5 * bf16.deltas)
    assert warm.total == ckpt.total + warm.warm_start
    unsaved = estimate_job_memory("llama-2-7b", batch_size=8, seq_len=64, dtype="bf16",
                                  warm_start=True)
    assert warm.total < unsaved.total  # checkpointing still pays on a real model
    plain = estimate_job_memory("llama-2-7b", batch_size=8, seq_len=64, warm_start=True)
    assert plain.total == base.total + int(3.5 * base.deltas)


def test_dataset_cache_counts_only_when_it_fits_its_budget() -> None:
    small = estimate_job_memory("gpt2-small", batch_size=8, seq_len=32, n_examples=8)
    none = estimate_job_memory("gpt2-small", batch_size=8, seq_len=32)
    assert small.ablated == 2 * none.ablated
    mid = estimate_job_memory("gpt2-small", batch_size=8, seq_len=32, n_examples=1000)
    assert mid.ablated == none.ablated, "too big for the cache: recomputed per batch"
    assert mid.logits > none.logits, "the full model's logits are cached first"
    huge = estimate_job_memory("gpt2-small", batch_size=8, seq_len=32, n_examples=100_000)
    assert huge.ablated == none.ablated and huge.logits == none.logits, (
        "logits over the budget are recomputed per batch too (engine/cache.py)")


def test_80gb_gpu_table() -> None:
    """docs/memory.md's table: bf16, batch 8 x 64, on an 80 GB GPU."""
    gpu = 80 * 10**9

    def fits(name: str, ckpt: bool, batch: int = 8, gpus: int = 1) -> bool:
        est = estimate_job_memory(
            name,
            batch_size=batch,
            seq_len=64,
            dtype="bfloat16",
            activation_checkpointing=ckpt,
            world_size=gpus,
        )
        try:
            check_fits(est, gpu)
        except ResourceExhausted:
            return False
        return True

    assert fits("smollm2-135m", False) and fits("gpt2-small", False)
    assert fits("llama-2-7b", False)
    assert not fits("codellama-13b", False) and not fits("codellama-13b", True)
    assert fits("codellama-13b", True, batch=4) and fits("codellama-13b", False, gpus=2)


def test_check_fits_reports_the_estimate() -> None:
    est = estimate_job_memory("codellama-13b", batch_size=8, seq_len=64)
    with pytest.raises(
        ResourceExhausted, match=r"job needs about \d+\.\d\d GiB.*activation checkpointing"
    ):
        check_fits(est, 80 * GiB)
    check_fits(est, None)  # CPU: not enforced
    check_fits(est, 10 * est.total)
    assert "weights" in str(est) and est.settings["model"] == "codellama-13b"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"batch_size": 0, "seq_len": 8}, "batch_size"),
        ({"batch_size": 2, "seq_len": 0}, "seq_len"),
        ({"batch_size": 2, "seq_len": 8, "dtype": "int3"}, "dtype"),
        ({"batch_size": 2, "seq_len": 8, "answer_positions": 9}, "answer_positions"),
        ({"batch_size": 2, "seq_len": 8, "world_size": 0}, "world_size"),
        ({"batch_size": 2, "seq_len": 8, "n_examples": -1}, "n_examples"),
    ],
)
def test_bad_arguments_name_their_field(kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        estimate_job_memory("gpt2-small", **kwargs)
    assert info.value.field == field


def test_an_evaluation_keeps_no_gradients_and_one_batch() -> None:
    job = estimate_job_memory("smollm2-135m", batch_size=16, seq_len=24)
    one = estimate_evaluation_memory("smollm2-135m", batch_size=16, seq_len=24)
    assert one.delta_grads == 0 and one.deltas == job.deltas and one.total < job.total
    two = estimate_evaluation_memory("smollm2-135m", batch_size=32, seq_len=24)
    assert two.deltas == 2 * one.deltas and two.ablated == 2 * one.ablated
    # a batch is never larger than the data; the data's corrupted run is cached within budget
    few = estimate_evaluation_memory("smollm2-135m", batch_size=1024, seq_len=24, n_examples=16)
    assert few.deltas == one.deltas and few.ablated == 2 * one.ablated
    many = estimate_evaluation_memory("smollm2-135m", batch_size=16, seq_len=24,
                                      n_examples=100_000)  # too many to cache: recomputed
    assert many.ablated == one.ablated and many.settings["evaluation"]
    with pytest.raises(ResourceExhausted) as info:
        check_fits(estimate_evaluation_memory("llama-2-7b", batch_size=64, seq_len=512), 8 * GiB)
    assert "job needs about" in str(info.value)
    assert "checkpointing" not in str(info.value) and "GPUs" not in str(info.value)
    for name, shape in PRESETS.items():  # the reader inputs of one of the forward's blocks
        est = estimate_evaluation_memory(shape, batch_size=2, seq_len=8)
        readers = block_layers(shape.n_layers) * (shape.n_heads + 2 * shape.n_kv_heads + 1)
        assert est.activations == (readers + GRAD_M_ROWS - 1) * est.deltas // shape.n_writers, name
    with pytest.raises(InvalidArgument) as bad:
        estimate_evaluation_memory("gpt2-small", batch_size=0, seq_len=8)
    assert bad.value.field == "batch_size"


def test_bad_model_configs_are_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="model_type 'bert'"):
        ModelShape.from_config({"model_type": "bert"})
    with pytest.raises(InvalidArgument, match="multiple of n_kv_heads"):
        ModelShape(2, 6, 4, 64, 128, 100)
    with pytest.raises(InvalidArgument, match="cannot read model config"):
        ModelShape.from_config_file(tmp_path)
    with pytest.raises(InvalidArgument, match="unknown model preset"):
        estimate_job_memory("gpt5", batch_size=1, seq_len=1)
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "hidden_size": 64,
                "intermediate_size": 0,
                "vocab_size": 10,
            }
        )
    )
    with pytest.raises(InvalidArgument) as info:
        ModelShape.from_config_file(tmp_path)
    assert info.value.field == "d_ff"


def test_track_peak_memory_sees_a_transient_tensor() -> None:
    with track_peak_memory("cpu") as peak:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del x
    assert peak.increase >= 48 * 2**20


# Calibration: the estimate against the measured peak of two real pruning steps (random weights,
# run in a fresh process; see bench/bench_memory.py): a GPT-2-like model in fp32, a LLaMA-like
# one (GQA, RMSNorm upcasting to fp32) in bf16, and a smaller GPT-2-like one with activation
# checkpointing. Shapes sized so that tensors dominate the
# interpreter's own noise.
CALIBRATION_CASES = [
    {
        "shape": {
            "n_layers": 6,
            "n_heads": 8,
            "n_kv_heads": 8,
            "d_model": 512,
            "d_ff": 2048,
            "vocab_size": 8192,
            "has_pos": True,
            "n_positions": 128,
            "gated_mlp": False,
            "attn_bias": True,
            "name": "gpt2-like",
        },
        "batch": 8,
        "seq": 64,
    },
    {
        "shape": {
            "n_layers": 8,
            "n_heads": 8,
            "n_kv_heads": 2,
            "d_model": 384,
            "d_ff": 1024,
            "vocab_size": 8192,
            "name": "llama-like",
        },
        "batch": 16,
        "seq": 48,
        "dtype": "bfloat16",
    },
    {  # checkpointing keeps every layer's reader inputs; measured ~270 MiB, ~20 s
        "shape": {
            "n_layers": 6,
            "n_heads": 8,
            "n_kv_heads": 8,
            "d_model": 256,
            "d_ff": 1024,
            "vocab_size": 8192,
            "has_pos": True,
            "n_positions": 128,
            "gated_mlp": False,
            "attn_bias": True,
            "name": "gpt2-like-checkpointed",
        },
        "batch": 8,
        "seq": 64,
        "activation_checkpointing": True,
    },
]


# An evaluation (no gradients; metrics.evaluate_many of one circuit) against its estimate: with
# the corrupted activations cached, and with too many examples for the cache's budget, so that
# every batch recomputes them.
EVALUATION_CASES = [
    {"shape": {**CALIBRATION_CASES[0]["shape"], "name": "gpt2-like-evaluation-cached"},
     "batch": 32, "seq": 64, "examples": 64, "evaluate": True},
    {"shape": {**CALIBRATION_CASES[1]["shape"], "name": "llama-like-evaluation-recomputed"},
     "batch": 48, "seq": 48, "examples": 220, "evaluate": True},
]
CALIBRATION_CASES += EVALUATION_CASES


@pytest.mark.parametrize("case", CALIBRATION_CASES, ids=lambda c: c["shape"]["name"])
def test_estimate_is_within_tolerance_of_a_measured_peak(case: dict) -> None:
    result = measure_in_subprocess(case, timeout=400)
    ratio = result["estimate_bytes"] / result["measured_bytes"]
    assert abs(ratio - 1) <= CALIBRATION_TOLERANCE, result
