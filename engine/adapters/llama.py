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
from edgeprune.engine.adapters.base import Adapter, output_heads, project_heads


def _bias(linear: nn.Linear, heads: int, head_dim: int) -> torch.Tensor | None:
    """A projection's bias as [heads, K] (a view), or None."""
    return None if linear.bias is None else linear.bias.view(heads, head_dim)


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

    def qkv(self, layer, xq, xk, xv, position_ids):
        block = self.body.layers[layer]
        attn = block.self_attn
        H, KV = self.n_heads, self.n_kv_heads
        norm = block.input_layernorm
        q = self._project(norm, xq, attn.q_proj, H)  # [B, H, T, K]
        k = self._project(norm, xk, attn.k_proj, KV)  # [B, KV, T, K]
        v = self._project(norm, xv, attn.v_proj, KV)  # [B, KV, T, K]
        cos, sin = self.body.rotary_emb(q, position_ids)  # [B, T, K] each
        q, k = apply_rotary_pos_emb(q, k, cos, sin)  # [B, H, T, K], [B, KV, T, K]
        return q, k, v

    def _project(
        self, norm: nn.Module, x: torch.Tensor, proj: nn.Linear, heads: int
    ) -> torch.Tensor:
        """Per-reader norm then head projection: x [R, B, T, D] -> [B, R, T, K] (R = heads)."""
        w = proj.weight.view(heads, self.head_dim, self.d_model)  # [R, K, D] (view)
        if type(norm).__name__ in STANDARD_RMS_NORMS:
            out = rms_norm_project(x, norm, w)  # [B, R, T, K]
            bias = _bias(proj, heads, self.head_dim)  # [R, K] or None
            return out if bias is None else out + bias[None, :, None, :]
        return project_heads(norm(x), w, _bias(proj, heads, self.head_dim))  # [B, R, T, K]

    def attn_scale(self, layer: int) -> float:
        return self.body.layers[layer].self_attn.scaling

    def sliding_window(self, layer: int) -> int | None:
        attn = self.body.layers[layer].self_attn
        if self.arch == "mistral":  # Mistral reads the window from its config on every layer
            return getattr(attn.config, "sliding_window", None)
        return getattr(attn, "sliding_window", None)

    def heads_out(self, layer, z):
        o_proj = self.body.layers[layer].self_attn.o_proj
        w = o_proj.weight.view(self.d_model, self.n_heads, self.head_dim).permute(
            1, 2, 0
        )  # [H, K, D]
        return output_heads(z, w, o_proj.bias)  # [H, B, T, D]

    def mlp(self, layer, x):
        block = self.body.layers[layer]
        return block.mlp(block.post_attention_layernorm(x))  # [..., D]

    def unembed(self, x):
        return self.module.lm_head(self.body.norm(x))  # [..., V]

    def reference_logits(self, input_ids, attention_mask):
        return self.module(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, T, V]
