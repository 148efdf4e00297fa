"""The real default model, SmolLM2-135M-Instruct: it loads (through the safetensors cache), solves
IOI, and the masked forward reproduces it with every mask at 1 and the corrupted run at 0."""

from __future__ import annotations

import pytest
import torch

from edgeprune.engine.demo import demo_runs
from edgeprune.engine.loading import DEFAULT_MODEL, cache_root, load_model
from edgeprune.engine.masked import CircuitModel

pytestmark = pytest.mark.slow

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Alice and Bob went to the store, Charlie gave a drink to"  # ABC names


@pytest.fixture(scope="module")
def smollm2() -> CircuitModel:
    """Loaded once per module from the default cache (converted from GGUF on the first run)."""
    return load_model(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def prompts(smollm2: CircuitModel) -> tuple[torch.Tensor, torch.Tensor]:
    clean = smollm2.tokenizer(CLEAN, return_tensors="pt").input_ids  # [1, T]
    corrupted = smollm2.tokenizer(CORRUPTED, return_tensors="pt").input_ids  # [1, T]
    assert clean.shape == corrupted.shape
    return clean, corrupted


def test_loads_frozen_from_the_cache(smollm2: CircuitModel) -> None:
    cached = cache_root() / DEFAULT_MODEL
    assert (cached / "model.safetensors").is_file() and (cached / "source.json").is_file()
    assert (smollm2.arch, smollm2.n_layers, smollm2.n_heads, smollm2.n_kv_heads) == ("llama", 30, 9, 3)
    assert (smollm2.graph.n_writers, smollm2.graph.n_edges) == (301, 70_651)
    assert all(not p.requires_grad for p in smollm2.module.parameters())
    assert smollm2.dtype == torch.float32


def test_solves_ioi(smollm2: CircuitModel, prompts: tuple[torch.Tensor, torch.Tensor]) -> None:
    clean, _ = prompts
    with torch.no_grad():
        probs = smollm2.reference_logits(clean)[0, -1].softmax(-1)  # [V]
    top = int(probs.argmax())
    assert smollm2.tokenizer.decode([top]) == " Mary"
    assert 0.85 < float(probs[top]) < 0.97  # about 0.92


def test_all_masks_one_and_zero(smollm2: CircuitModel, prompts: tuple[torch.Tensor, torch.Tensor]) -> None:
    clean, corrupted = prompts
    graph = smollm2.graph
    with torch.no_grad():
        hf_clean = smollm2.module(clean).logits  # [1, T, V]
        hf_corrupted = smollm2.module(corrupted).logits  # [1, T, V]
        ones = smollm2.logits(clean, edge_mask=torch.ones(graph.n_edges), ablation="zero")
        zeros = smollm2.logits(clean, corrupted_ids=corrupted, edge_mask=torch.zeros(graph.n_edges))
    assert (ones - hf_clean).abs().max() <= 1e-3
    assert (zeros - hf_corrupted).abs().max() <= 1e-3


def test_demo_runs_show_the_circuit_at_work(smollm2: CircuitModel) -> None:
    """The demo's three answers: Mary; a corrupted name once every edge is ablated; and Mary much
    less likely once the late heads' direct edges to the logits are cut."""
    (_, full), (_, empty), (label, partial) = demo_runs(smollm2)
    assert full[0][0] == " Mary" and full[0][1] > 0.85
    assert empty[0][0] in (" Alice", " Bob", " Charlie")
    assert label.startswith("90 edges a20-a29")
    mary = dict(partial).get(" Mary", 0.0)
    assert mary < full[0][1] / 2
