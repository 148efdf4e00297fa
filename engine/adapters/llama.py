"""LLaMA family adapter: ``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``MistralForCausalLM``.

RMSNorm, rotary embeddings through the model's own rotary module (so scaled RoPE variants are
exactly the model's), grouped-query attention, q/k/v/o biases where the module has them, sliding
windows where a layer has one, tied or untied unembedding.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from edgeprune.engine.adapters._norm_project import RMS_NORMS, rms_norm_project
from edgeprune.engine.adapters.base import (
    Adapter,
    GradInto,
    linear_heads,
    linear_out_heads,
    project_heads,
)


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

    def _projections(self, layer: int, part: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The heads of the query (``part`` "q") or of the key then value ("kv") projections:
        weight [R, K, D] and bias [R, K] or None (see ``linear_heads``)."""
        attn = self.body.layers[layer].self_attn
        projs = (attn.q_proj,) if part == "q" else (attn.k_proj, attn.v_proj)
        return linear_heads(projs, self.head_dim)

    def _heads(
        self, layer: int, x: torch.Tensor, part: str, grad_into: GradInto | None
    ) -> torch.Tensor:
        """Per-reader RMSNorm and projection by the heads of ``part`` ("q" or "kv"):
        x [R, B, T, D] -> [B, R, T, K]."""
        w, b = self._projections(layer, part)  # [R, K, D] and [R, K] or None
        norm = self.body.layers[layer].input_layernorm
        if type(norm).__name__ in RMS_NORMS:
            return rms_norm_project(x, norm, w, b, grad_into)  # [B, R, T, K]
        return project_heads(norm(x), w, b)  # [B, R, T, K]

    def _rotate(self, t: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Rotary embedding by the model's own rotary module: t [B, R, T, K] -> [B, R, T, K].

        The rotary module's width may be less than K (partial rotary, e.g. Phi-3's
        ``partial_rotary_factor``): then, as the model does, only the first dimensions of every
        head turn and the rest pass through. Where the module returns float32 cos and sin for a
        bf16 model (OLMo's), the rotation runs in float32 and is rounded once, as the model's."""
        cos, sin = self.body.rotary_emb(t, position_ids)  # [B|1, T, Kr] each, Kr <= K
        cos, sin = cos[:, None], sin[:, None]  # [B|1, 1, T, Kr]
        r = cos.shape[-1]
        if r == t.shape[-1]:  # as the model's apply_rotary_pos_emb
            return (t * cos + rotate_half(t) * sin).to(t.dtype)
        turned, kept = t[..., :r], t[..., r:]  # [B, R, T, Kr], [B, R, T, K - Kr]
        return torch.cat([(turned * cos + rotate_half(turned) * sin).to(t.dtype), kept], dim=-1)

    def queries(self, layer, x, position_ids, grad_into=None):
        q = self._heads(layer, x, "q", grad_into)  # [B, H, T, K]
        return self._rotate(q, position_ids)

    def keys_values(self, layer, x, position_ids, grad_into=None):
        kv = self._heads(layer, x, "kv", grad_into)  # [B, 2KV, T, K]
        k, v = kv.split(self.n_kv_heads, dim=1)
        return self._rotate(k, position_ids), v  # [B, KV, T, K] each

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

    def reference_logits(self, input_ids, attention_mask, positions=None):
        # the unembedding only at the positions: [B, P, V] (the whole sequence: [B, T, V])
        keep = 0 if positions is None else positions
        return self.module(
            input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep
        ).logits
