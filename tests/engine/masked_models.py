"""Tiny in-memory models for the masked-forward tests (the slow reference they are checked
against is the engine's specification, ``edgeprune.engine.reference``).

Every parameter (biases and norm weights included, which Hugging Face initialises to 0 / 1) is
re-drawn at random so a mistake in any of them shows in the logits.
"""

from __future__ import annotations

import copy
import types

import torch
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


def float64(module: nn.Module) -> nn.Module:
    """A float64 copy of an HF model whose RMSNorms compute in float64 too."""
    module = copy.deepcopy(module).double()
    for sub in module.modules():
        if type(sub).__name__.endswith("RMSNorm"):
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
