"""Model families beyond GPT-2 and the LLaMA layout, each proven as those are: checkpoints from
``tests/tiny_models.py`` loaded by ``load_model("hf:<folder>")``, all masks 1 equal to the model's
logits, all masks 0 to the corrupted run's, random masks to the specification
(engine/reference.py), mask gradients to finite differences (float64), and the memory model's
parameter count to the loaded model's.

Add a family to ``FAMILIES`` (with its tiny config in ``tests/tiny_models.py``) and to
``FEATURES`` (what its tiny config exercises).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from bench import bench_families
from edgeprune.engine.loading import check_model, load_model
from edgeprune.engine.masked import CircuitModel
from edgeprune.engine.memory import ModelShape
from tests.engine.masked_models import (
    batch,
    check_all_masks_one_equal_hf,
    check_all_masks_one_in_dtype,
    check_all_masks_zero_equal_corrupted,
    check_mask_gradients,
    check_random_masks_match_reference,
    float64,
)
from tests.tiny_models import tiny_llama

FAMILIES = ["qwen3", "phi3", "olmo", "olmo2", "gemma"]


def _qwen3(model: CircuitModel) -> None:
    c = model.module.config
    assert model.adapter.head_dim == c.head_dim != c.hidden_size // c.num_attention_heads
    attn = model.module.model.layers[0].self_attn
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (c.head_dim,)


def _phi3(model: CircuitModel) -> None:
    module = model.module
    ids, _, _ = batch()
    cos, _ = module.model.rotary_emb(torch.zeros(1), torch.arange(ids.shape[1])[None])
    assert cos.shape[-1] < model.adapter.head_dim  # partial rotary
    assert module.config.sliding_window < ids.shape[1]  # the window masks some keys
    assert module.lm_head.weight.data_ptr() != module.model.embed_tokens.weight.data_ptr()


def _olmo(model: CircuitModel) -> None:
    module = model.module
    clip = module.config.clip_qkv
    ids, _, _ = batch()
    layer = module.model.layers[0]
    with torch.no_grad():
        q = layer.self_attn.q_proj(layer.input_layernorm(module.model.embed_tokens(ids)))
    assert (q.abs() > clip).float().mean() > 0.1  # the clamp changes many projections
    assert not list(layer.input_layernorm.parameters())  # a LayerNorm without parameters


def _olmo2(model: CircuitModel) -> None:
    module = model.module
    c = module.config
    attn = module.model.layers[0].self_attn
    # q_norm and k_norm over every head's projection together, not per head
    assert attn.q_norm.weight.shape == (c.num_attention_heads * model.adapter.head_dim,)
    assert attn.k_norm.weight.shape == (model.n_kv_heads * model.adapter.head_dim,)
    assert model.n_kv_heads < model.n_heads
    assert model.adapter.post_attention_norm
    assert not hasattr(module.model.layers[0], "input_layernorm")  # norms after, not before
    assert module.lm_head.weight.data_ptr() != module.model.embed_tokens.weight.data_ptr()


def _gemma(model: CircuitModel) -> None:
    module = model.module
    ids, _, _ = batch()
    with torch.no_grad():
        plain = torch.nn.functional.embedding(ids, module.model.embed_tokens.weight)
        torch.testing.assert_close(model.adapter.embed(ids, torch.arange(ids.shape[1])[None])[0],
                                   plain * module.config.hidden_size**0.5)
    assert type(module.model.norm).__name__ == "GemmaRMSNorm"
    assert module.lm_head.weight.data_ptr() == module.model.embed_tokens.weight.data_ptr()


# family -> a check that its tiny config exercises what the adapter handles
FEATURES: dict[str, Callable[[CircuitModel], None]] = {
    "qwen3": _qwen3,
    "phi3": _phi3,
    "olmo": _olmo,
    "olmo2": _olmo2,
    "gemma": _gemma,
}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory) -> tuple[str, Path, CircuitModel]:
    """(family, checkpoint folder, the loaded model)."""
    folder = tiny_llama(tmp_path_factory.mktemp(request.param), kind=request.param)
    return request.param, folder, load_model(f"hf:{folder}")


def test_loads_and_exercises_its_features(family):
    kind, folder, model = family
    assert model.arch == kind
    check_model(f"hf:{folder}")  # what provision-models checks of an allow-listed model
    assert model.tokenizer.padding_side == "right"
    FEATURES[kind](model)


def test_all_masks_one_equals_hf(family):
    check_all_masks_one_equal_hf(family[2])


def test_all_masks_zero_equals_hf_on_corrupted_ids(family):
    check_all_masks_zero_equal_corrupted(family[2])


def test_all_masks_one_match_the_model_in_bf16(family):
    check_all_masks_one_in_dtype(CircuitModel(copy.deepcopy(family[2].module).bfloat16()))


@pytest.mark.parametrize("ablation", ["corrupted", "zero", "mean"])
def test_random_masks_match_slow_reference(family, ablation):
    check_random_masks_match_reference(family[2], ablation)


@pytest.fixture(scope="module")
def family64(family) -> CircuitModel:
    return CircuitModel(float64(family[2].module))


@pytest.mark.parametrize("ablation", ["corrupted", "zero", "mean"])
def test_mask_gradients_match_finite_differences(family64, ablation):
    check_mask_gradients(family64, ablation)


def test_memory_model_counts_the_parameters(family):
    _, folder, model = family
    n_params = sum(p.numel() for p in model.module.parameters())
    assert ModelShape.from_model(model).n_params == n_params
    assert ModelShape.from_config_file(folder).n_params == n_params
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    assert ModelShape.from_config(config).n_params == n_params


# published parameter counts of the models in bench/bench_families.py, from their model cards
PUBLISHED_PARAMS = {
    "Qwen3-0.6B": 0.6e9, "Qwen3-32B": 32.8e9, "Phi-3-mini-4k": 3.8e9, "Phi-4": 14.7e9,
    "OLMo-1B": 1.18e9, "OLMo-7B": 6.89e9, "OLMo-2-1B": 1.48e9, "OLMo-2-32B": 32.2e9,
    "Gemma-2B": 2.51e9, "Gemma-7B": 8.54e9,
}


def test_the_80gb_table_is_current():
    """docs/operations.md's table is bench/results/families.md's, which is what the memory
    model says now, of configs that give the published parameter counts."""
    rows = bench_families.rows()
    for row in rows:
        published = PUBLISHED_PARAMS.get(row["model"])
        if published is not None:
            assert row["params_b"] * 1e9 == pytest.approx(published, rel=0.01), row["model"]
    root = Path(__file__).resolve().parents[2]
    page = bench_families.page(rows)
    assert (root / "bench" / "results" / "families.md").read_text() == page, (
        "run: python -m bench families")
    assert bench_families.table(rows) in (root / "docs" / "operations.md").read_text()
