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
from edgeprune.engine.attribution import attribute, scored_circuit
from edgeprune.engine.errors import InvalidArgument
from edgeprune.engine.export import circuit_to_dot, graph_of
from edgeprune.engine.loading import check_model, load_model
from edgeprune.engine.masked import CircuitModel
from edgeprune.engine.memory import ModelShape
from edgeprune.engine.tasks import build_task
from tests.engine.masked_models import (
    batch,
    check_all_masks_one_equal_hf,
    check_all_masks_one_in_dtype,
    check_all_masks_zero_equal_corrupted,
    check_mask_gradients,
    check_random_masks_match_reference,
    float64,
)
from tests.tiny_models import tiny_gpt_neox, tiny_llama

FAMILIES = ["qwen3", "phi3", "olmo", "olmo2", "gemma", "gemma2", "gpt_neox"]
# family -> its checkpoint factory where it is not ``tiny_llama(folder, kind=family)``
FACTORIES: dict[str, Callable[[Path], Path]] = {"gpt_neox": tiny_gpt_neox}


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


def _logits_change(model: CircuitModel, uncap: Callable[[torch.nn.Module], None]) -> None:
    """A copy of the model with ``uncap`` applied has other logits, and the masked forward (all
    masks 1) still equals the copy's own: the adapter reads the setting from the module."""
    ids, _, mask = batch()
    valid = mask.bool()
    plain = copy.deepcopy(model.module)
    uncap(plain)
    other = CircuitModel(plain)
    expected = other.reference_logits(ids, attention_mask=mask)
    assert (expected - model.reference_logits(ids, attention_mask=mask))[valid].abs().max() > 1e-2
    got = other.logits(ids, attention_mask=mask, ablation="zero")
    assert (got - expected)[valid].abs().max() <= 1e-4


def _gemma2(model: CircuitModel) -> None:
    module, a = model.module, model.adapter
    c = module.config
    ids, _, _ = batch()
    windows = [a.sliding_window(layer) for layer in range(model.n_layers)]
    assert windows == [c.sliding_window, None, c.sliding_window]  # alternating
    assert c.sliding_window < ids.shape[1]  # the window masks some keys
    assert a.attn_scale(0) == c.query_pre_attn_scalar**-0.5 != a.head_dim**-0.5
    assert a.post_attention_norm and not model.graph.parallel_attn_mlp

    def no_attn_cap(m: torch.nn.Module) -> None:
        for layer in m.model.layers:
            layer.self_attn.attn_logit_softcapping = None

    def no_final_cap(m: torch.nn.Module) -> None:
        m.config.final_logit_softcapping = None

    _logits_change(model, no_attn_cap)  # both soft-caps bite
    _logits_change(model, no_final_cap)


def _gpt_neox(model: CircuitModel) -> None:
    module, g = model.module, model.graph
    assert 0 < module.gpt_neox.layers[0].attention.rotary_ndims < model.adapter.head_dim
    assert module.lm_head.weight.data_ptr() != module.gpt_neox.embed_in.weight.data_ptr()
    # parallel residual: MLP l reads the layer's input, so no edge from layer l's heads to it
    assert g.parallel_attn_mlp
    assert "a0.h3->m1" in g.edges and "m0->m1" in g.edges
    with pytest.raises(InvalidArgument):
        g.edge_index("a1.h0->m1")
    assert g.n_upstream[g.reader_index("m1")] == g.layer_start(1)
    assert ModelShape.from_model(model).n_edges == g.n_edges
    # downstream of the graph: attribution, a circuit of live edges that records its graph,
    # DOT export, and the circuit's edge and node masks in a forward
    ioi = build_task("ioi", model.tokenizer, n=8, seed=0)
    scores = attribute(model, ioi, "eap", batch_size=8)
    circuit = scored_circuit(model, ioi, scores, method="eap", edge_count=40)
    assert circuit.edge_count == 40 and graph_of(circuit) == g
    assert "m1" in circuit_to_dot(circuit)
    ids, corrupted, mask = batch()
    out = model.logits(ids, attention_mask=mask, corrupted_ids=corrupted,
                       edge_mask=circuit.edge_mask(g), node_mask=circuit.node_mask(g))
    assert torch.isfinite(out).all()


# family -> a check that its tiny config exercises what the adapter handles
FEATURES: dict[str, Callable[[CircuitModel], None]] = {
    "qwen3": _qwen3,
    "phi3": _phi3,
    "olmo": _olmo,
    "olmo2": _olmo2,
    "gemma": _gemma,
    "gemma2": _gemma2,
    "gpt_neox": _gpt_neox,
}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory) -> tuple[str, Path, CircuitModel]:
    """(family, checkpoint folder, the loaded model)."""
    kind, folder = request.param, tmp_path_factory.mktemp(request.param)
    folder = FACTORIES[kind](folder) if kind in FACTORIES else tiny_llama(folder, kind=kind)
    return kind, folder, load_model(f"hf:{folder}")


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


# family -> its bf16 tolerance (of the largest logit) where DTYPE_TOLERANCE's is too tight for its
# tiny model: Gemma-2's norms after attention and after the MLP scale small outputs, and their
# rounding error, up to the residual's size, so the model's own bf16 logits already lie about that
# far from its fp32 ones
BF16_TOLERANCE = {"gemma2": 0.1}


def test_all_masks_one_match_the_model_in_bf16(family):
    kind, _, model = family
    check_all_masks_one_in_dtype(CircuitModel(copy.deepcopy(model.module).bfloat16()),
                                 BF16_TOLERANCE.get(kind))


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


def test_gpt_neox_with_sequential_residual(tmp_path):
    """``use_parallel_residual=False``: the MLP reads its own layer's heads again, as GPT-2's."""
    folder = tiny_gpt_neox(tmp_path, parallel=False)
    model = load_model(f"hf:{folder}")
    g = model.graph
    assert not g.parallel_attn_mlp and "a1.h0->m1" in g.edges
    parallel = ModelShape.from_model(model).n_edges - g.n_layers * g.n_heads
    assert (g.n_edges, parallel) == (ModelShape.from_config_file(folder).n_edges, 250)
    check_all_masks_one_equal_hf(model)
    check_all_masks_zero_equal_corrupted(model)
    check_random_masks_match_reference(model, "corrupted")


# published parameter counts of the models in bench/bench_families.py, from their model cards
PUBLISHED_PARAMS = {
    "Qwen3-0.6B": 0.6e9, "Qwen3-32B": 32.8e9, "Phi-3-mini-4k": 3.8e9, "Phi-4": 14.7e9,
    "OLMo-1B": 1.18e9, "OLMo-7B": 6.89e9, "OLMo-2-1B": 1.48e9, "OLMo-2-32B": 32.2e9,
    "Gemma-2B": 2.51e9, "Gemma-7B": 8.54e9, "GPT-2 small": 124e6, "GPT-2 XL": 1.5576e9,
    "SmolLM2-135M": 134.5e6, "Llama-3.2-1B": 1.236e9, "Llama-3.1-70B": 70.55e9,
    "Qwen2.5-0.5B": 0.494e9, "Qwen2.5-72B": 72.7e9, "Mistral-7B": 7.24e9, "Pythia-70M": 70.4e6,
    "Pythia-12B": 11.85e9, "Gemma-2-2B": 2.61e9, "Gemma-2-27B": 27.2e9,
}


def test_the_80gb_table_is_current():
    """docs/operations.md's table is bench/results/families.md's, which is what the memory
    model says now, of configs that give the published parameter counts."""
    rows = bench_families.rows()
    for row in rows:
        published = PUBLISHED_PARAMS.get(row["model"])
        if published is not None:
            assert row["params"] == pytest.approx(published, rel=0.01), row["model"]
    root = Path(__file__).resolve().parents[2]
    page = bench_families.page(rows)
    assert (root / "bench" / "results" / "families.md").read_text() == page, (
        "run: python -m bench families")
    assert bench_families.table(rows) in (root / "docs" / "operations.md").read_text()
