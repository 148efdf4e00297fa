"""LLaMA family adapter: ``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``MistralForCausalLM``.

RMSNorm, rotary embeddings through the model's own rotary module (so scaled RoPE variants are
exactly the model's), grouped-query attention, q/k/v/o biases where the module has them, sliding
windows where a layer has one, tied or untied unembedding.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from edgeprune.engine.adapters._norm_project import STANDARD_RMS_NORMS, rms_norm_project
from edgeprune.engine.adapters.base import Adapter, linear_heads, linear_out_heads, project_heads


class LlamaAdapter(Adapter):
    """Adapter over a Hugging Face LLaMA-style causal LM (llama, qwen2, mistral)."""

    has_pos = False

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        config = module.config
        self.arch = config.model_type
        self.body = module.model
        self.n_layers = config.num_hidden_layers
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads or config.num_attention_heads
        self.d_model = config.hidden_size
        self.head_dim = getattr(config, "head_dim", None) or self.d_model // self.n_heads
        self.vocab_size = config.vocab_size
        self.input_vocab_size = self.body.embed_tokens.num_embeddings

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.body.embed_tokens(input_ids)[None]  # [1, B, T, D]

    def qkv(self, layer, x, position_ids):
        block = self.body.layers[layer]
        attn = block.self_attn
        H, KV = self.n_heads, self.n_kv_heads
        # [H + 2KV, K, D] and [H + 2KV, K] or None
        w, b = linear_heads((attn.q_proj, attn.k_proj, attn.v_proj), self.head_dim)
        norm = block.input_layernorm
        if type(norm).__name__ in STANDARD_RMS_NORMS:
            out = rms_norm_project(x, norm, w, b)  # [B, H + 2KV, T, K]
        else:
            out = project_heads(norm(x), w, b)  # [B, H + 2KV, T, K]
        q, k, v = out.split((H, KV, KV), dim=1)  # [B, H|KV, T, K]
        cos, sin = self.body.rotary_emb(q, position_ids)  # [B, T, K] each
        q, k = apply_rotary_pos_emb(q, k, cos, sin)  # [B, H, T, K], [B, KV, T, K]
        return q, k, v

    def attn_scale(self, layer: int) -> float:
        return self.body.layers[layer].self_attn.scaling

    def sliding_window(self, layer: int) -> int | None:
        attn = self.body.layers[layer].self_attn
        if self.arch == "mistral":  # Mistral reads the window from its config on every layer
            return getattr(attn.config, "sliding_window", None)
        return getattr(attn, "sliding_window", None)

    def out_proj(self, layer):
        attn = self.body.layers[layer].self_attn
        return linear_out_heads(attn.o_proj, self.n_heads, self.head_dim)  # [H, K, D], [D] | None

    def mlp(self, layer, x):
        block = self.body.layers[layer]
        return block.mlp(block.post_attention_layernorm(x))  # [..., D]

    def unembed(self, x):
        return self.module.lm_head(self.body.norm(x))  # [..., V]

    def reference_logits(self, input_ids, attention_mask):
        return self.module(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, T, V]
