"""Qwen3 adapter (``Qwen3ForCausalLM``): LLaMA's layout with an RMSNorm on every query and key head.

Qwen3 normalises each head's projected query and key over the head width (``q_norm`` /
``k_norm``, one weight [K] shared by the heads) before the rotary embedding; the head width is
the config's ``head_dim``, not D / H. Per head, so it applies to each reader's own projection
unchanged.
"""

from __future__ import annotations

from edgeprune.engine.adapters.llama import LlamaAdapter


class Qwen3Adapter(LlamaAdapter):
    """Adapter over a Hugging Face ``Qwen3ForCausalLM``."""

    def queries(self, layer, x, position_ids, grad_into=None):
        attn = self.body.layers[layer].self_attn
        q = attn.q_norm(self._heads(layer, x, "q", grad_into))  # [B, H, T, K]
        return self._rotate(q, position_ids)

    def keys_values(self, layer, x, position_ids, grad_into=None):
        attn = self.body.layers[layer].self_attn
        kv = self._heads(layer, x, "kv", grad_into)  # [B, 2KV, T, K]
        k, v = kv.split(self.n_kv_heads, dim=1)
        return self._rotate(attn.k_norm(k), position_ids), v  # [B, KV, T, K] each
