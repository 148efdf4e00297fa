"""Tiny in-memory models for the masked-forward tests (the slow reference they are checked
against is the engine's specification, ``edgeprune.engine.reference``).

Every parameter (biases and norm weights included, which Hugging Face initialises to 0 / 1) is
re-drawn at random so a mistake in any of them shows in the logits.
"""

from __future__ import annotations

import copy
import types

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from edgeprune.engine.masked import CircuitModel
from edgeprune.engine.reference import reference_run

VOCAB = 40
LLAMA_SHAPE = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 40,
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
}


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(
                torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p.dim() == 1 else 0.0) * 0.5
            )
    return module.eval()


def _float64_rms_norm(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm in the input's precision (HF's computes in float32 even for float64 models)."""
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _float64_offset_rms_norm(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Gemma's RMSNorm, scale (1 + weight), in the input's precision."""
    return (1 + self.weight) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def _float64_plain_layer_norm(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """OLMo's LayerNorm without weight or bias in the input's precision."""
    return F.layer_norm(x, self.normalized_shape, None, None, eps=1e-5)


# norm class -> its forward in the input's precision (HF's compute in float32 even for float64)
_FLOAT64_NORMS = {
    "GemmaRMSNorm": _float64_offset_rms_norm,
    "Gemma2RMSNorm": _float64_offset_rms_norm,
    "OlmoLayerNorm": _float64_plain_layer_norm,
}


def float64(module: nn.Module) -> nn.Module:
    """A float64 copy of an HF model whose norms compute in float64 too."""
    module = copy.deepcopy(module).double()
    for sub in module.modules():
        name = type(sub).__name__
        if name in _FLOAT64_NORMS:
            sub.forward = types.MethodType(_FLOAT64_NORMS[name], sub)
        elif name.endswith("RMSNorm"):
            sub.forward = types.MethodType(_float64_rms_norm, sub)
    return module


def tiny_models() -> dict[str, nn.Module]:
    """name -> tiny randomly weighted HF model covering every family and feature we support."""
    torch.manual_seed(0)
    return {
        "gpt2": _randomise(
            GPT2LMHeadModel(
                GPT2Config(
                    n_layer=2,
                    n_head=4,
                    n_embd=32,
                    vocab_size=VOCAB,
                    n_positions=32,
                    bos_token_id=0,
                    eos_token_id=0,
                )
            ),
            1,
        ),
        # 5 layers: mixing blocks of 2 layers ([0, 1], [2, 3], [4]) in the masked forward
        "gpt2-deep": _randomise(
            GPT2LMHeadModel(
                GPT2Config(
                    n_layer=5,
                    n_head=2,
                    n_embd=16,
                    vocab_size=VOCAB,
                    n_positions=32,
                    bos_token_id=0,
                    eos_token_id=0,
                )
            ),
            7,
        ),
        "llama-gqa": _randomise(LlamaForCausalLM(LlamaConfig(**LLAMA_SHAPE)), 2),
        "llama-rope-llama3-bias-untied": _randomise(
            LlamaForCausalLM(
                LlamaConfig(
                    **LLAMA_SHAPE,
                    attention_bias=True,
                    mlp_bias=True,
                    tie_word_embeddings=False,
                    rope_scaling={
                        "rope_type": "llama3",
                        "factor": 8.0,
                        "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 4,
                    },
                )
            ),
            3,
        ),
        "llama-rope-linear": _randomise(
            LlamaForCausalLM(
                LlamaConfig(**LLAMA_SHAPE, rope_scaling={"rope_type": "linear", "factor": 2.0})
            ),
            4,
        ),
        "qwen2": _randomise(Qwen2ForCausalLM(Qwen2Config(**LLAMA_SHAPE)), 5),
        "mistral-window": _randomise(
            MistralForCausalLM(
                MistralConfig(**{**LLAMA_SHAPE, "num_key_value_heads": 1}, sliding_window=3)
            ),
            6,
        ),
    }


def batch(
    seed: int = 0, *, B: int = 3, T: int = 7
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, corrupted_ids, attention_mask), right-padded with unequal lengths."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=gen)
    corrupted = torch.randint(0, VOCAB, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(1, B):
        mask[b, T - 2 * b :] = 0
    return ids, corrupted, mask


# ---- checks shared by the per-family test modules --------------------------------------------


def random_masks(model: CircuitModel, seed: int):
    """Random edge [E] and node [W] masks, dense and as the reference's dicts."""
    gen = torch.Generator().manual_seed(seed)
    g = model.graph
    edge = torch.rand(g.n_edges, generator=gen)
    node = torch.rand(g.n_writers, generator=gen)
    edge_d = {
        (w, r): float(edge[i]) for i, (w, _, r) in enumerate(e.partition("->") for e in g.edges)
    }
    node_d = {w: float(node[i]) for i, w in enumerate(g.writers)}
    return edge, node, edge_d, node_d


def check_all_masks_one_equal_hf(model: CircuitModel) -> None:
    """Every mask 1: the model's own logits."""
    ids, corrupted, mask = batch()
    valid = mask.bool()
    expected = model.reference_logits(ids, attention_mask=mask)  # [B, T, V]
    got = model.logits(ids, attention_mask=mask, corrupted_ids=corrupted)
    assert got.shape == expected.shape
    assert (got - expected)[valid].abs().max() <= 1e-4
    # the module's own forward, not our reference_logits wrapper
    direct = model.module(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(direct, expected)


# The masked forward sums the same terms in another order, each rounded to the dtype: in bf16
# (8 bits) about 10 steps of the largest logit, in fp32 far less.
DTYPE_TOLERANCE = {torch.bfloat16: 0.04, torch.float32: 1e-4}


def check_all_masks_one_in_dtype(model: CircuitModel, tolerance: float | None = None) -> None:
    """Every mask 1 in the model's dtype and on its device: the model's own logits in that dtype,
    within ``tolerance`` (default DTYPE_TOLERANCE) of the largest."""
    ids, corrupted, mask = (t.to(model.device) for t in batch())
    valid = mask.bool()  # [B, T]
    reference = model.reference_logits(ids, attention_mask=mask).float()[valid]  # [n, V]
    out = model.logits(ids, attention_mask=mask, corrupted_ids=corrupted)  # [B, T, V]
    assert out.dtype == model.dtype
    scale = reference.abs().max()
    tolerance = DTYPE_TOLERANCE[model.dtype] if tolerance is None else tolerance
    assert (out.float()[valid] - reference).abs().max() <= tolerance * scale


def check_all_masks_zero_equal_corrupted(model: CircuitModel) -> None:
    """Every edge mask 0, or every node mask 0: the model's logits on the corrupted ids."""
    ids, corrupted, mask = batch(1)
    valid = mask.bool()
    expected = model.reference_logits(corrupted, attention_mask=mask)
    g = model.graph
    zeros = torch.zeros(g.n_edges)
    got = model.logits(ids, attention_mask=mask, corrupted_ids=corrupted, edge_mask=zeros)
    assert (got - expected)[valid].abs().max() <= 1e-4
    # node masks at 0 on every writer ablate every edge too
    got = model.logits(
        ids, attention_mask=mask, corrupted_ids=corrupted, node_mask=torch.zeros(g.n_writers)
    )
    assert (got - expected)[valid].abs().max() <= 1e-4
    # and the clean run really differs from the corrupted one
    clean = model.reference_logits(ids, attention_mask=mask)
    assert (clean - expected)[valid].abs().max() > 1e-2


def check_random_masks_match_reference(model: CircuitModel, ablation: str) -> None:
    """Random edge and node masks: the logits of the specification, engine/reference.py."""
    ids, corrupted, mask = batch(4)
    valid = mask.bool()
    edge, node, edge_d, node_d = random_masks(model, 5)
    hf = model.module
    if ablation == "corrupted":
        _, ablated = reference_run(hf, corrupted, valid)
    elif ablation == "mean":
        _, outs = reference_run(hf, corrupted, valid)
        weight = valid[:, :, None].float()
        count = weight.sum(0).clamp(min=1)
        ablated = {w: (y * weight).sum(0, keepdim=True) / count for w, y in outs.items()}
    else:
        ablated = None
    expected, _ = reference_run(hf, ids, valid, edge_d, node_d, ablated)
    got = model.logits(
        ids,
        attention_mask=mask,
        corrupted_ids=corrupted,
        edge_mask=edge,
        node_mask=node,
        ablation=ablation,
    )
    assert (got - expected)[valid].abs().max() <= 1e-4
    # the all-ones reference is HF itself: the reference is right where HF can check it
    ref_full, _ = reference_run(hf, ids, valid)
    assert (ref_full - model.reference_logits(ids, attention_mask=mask))[valid].abs().max() <= 1e-4


def reader_group_blocks(model: CircuitModel) -> list[slice]:
    """The edge slices of every reader group (each layer's attention, its MLP, the logits)."""
    g = model.graph
    groups = [f(layer) for layer in range(g.n_layers) for f in (g.attn_group, g.mlp_group)]
    return [group.edges for group in groups + [g.logits_group()]]


def check_mask_gradients(model: CircuitModel, ablation: str) -> None:
    """Edge and node mask gradients of a float64 model against central differences along random
    directions, one per reader group's edges (so an error confined to one layer's edges cannot
    hide in the sum) and one over the node masks."""
    ids, corrupted, mask = batch(0, B=2, T=5)
    last = mask.sum(1) - 1
    g = model.graph
    gen = torch.Generator().manual_seed(1)
    edge = torch.rand(g.n_edges, generator=gen, dtype=torch.float64).requires_grad_()
    node = torch.rand(g.n_writers, generator=gen, dtype=torch.float64).requires_grad_()
    proj = torch.randn(2, model.vocab_size, generator=gen, dtype=torch.float64)

    def f(e: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        out = model.logits(
            ids,
            attention_mask=mask,
            corrupted_ids=corrupted,
            edge_mask=e,
            node_mask=n,
            ablation=ablation,
            positions=last,
        )  # [B, V]
        return (out * proj).sum()

    g_edge, g_node = torch.autograd.grad(f(edge, node), (edge, node))
    directions = []
    for block in reader_group_blocks(model):
        u = torch.zeros_like(edge)
        u[block] = torch.randn(u[block].shape, generator=gen, dtype=torch.float64)
        directions.append((u, torch.zeros_like(node)))
    directions.append(
        (torch.zeros_like(edge), torch.randn(node.shape, generator=gen, dtype=torch.float64))
    )
    eps = 1e-6
    with torch.no_grad():
        for u, v in directions:
            numeric = (f(edge + eps * u, node + eps * v) - f(edge - eps * u, node - eps * v)) / (
                2 * eps
            )
            analytic = g_edge @ u + g_node @ v
            torch.testing.assert_close(analytic, numeric, atol=1e-7, rtol=1e-6)
            assert analytic.abs() > 1e-4  # the check is not vacuous
