"""Phi-3 adapter (``Phi3ForCausalLM``; also Phi-3.5 and Phi-4, whose model_type is phi3).

LLaMA's layout with fused projections: ``qkv_proj`` holds the query heads' rows, then the key
heads', then the value heads' (each head K rows), and ``gate_up_proj`` the MLP's gate then up
halves (the model's own MLP runs it). Partial rotary (``partial_rotary_factor`` < 1, as Phi-4-mini)
turns only the first dimensions of every head, which ``LlamaAdapter._rotate`` follows from the
width of the model's rotary module. A sliding window, where the config sets one, applies to
every layer.
"""

from __future__ import annotations

import torch

from edgeprune.engine.adapters.llama import LlamaAdapter


class Phi3Adapter(LlamaAdapter):
    """Adapter over a Hugging Face ``Phi3ForCausalLM``."""

    def _projections(self, layer: int, part: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        qkv = self.body.layers[layer].self_attn.qkv_proj
        K = self.head_dim
        rows = slice(0, self.n_heads) if part == "q" else slice(self.n_heads, None)
        weight = qkv.weight.view(-1, K, qkv.in_features)[rows]  # [R, K, D] (a view)
        bias = None if qkv.bias is None else qkv.bias.view(-1, K)[rows]  # [R, K]
        return weight, bias

    def sliding_window(self, layer: int) -> int | None:
        return getattr(self.module.config, "sliding_window", None)
