"""GPT-NeoX family adapter (``GPTNeoXForCausalLM``: Pythia, GPT-NeoX-20B).

LayerNorm with bias before attention and MLP; a fused ``query_key_value`` projection whose output
rows are laid out per head as [H, 3, K] (head h's q, then its k, then its v: the model views its
output as [..., H, 3K] and chunks the last dimension in three); partial rotary (``rotary_pct``:
only the first ``rotary_ndims`` dimensions of every head turn); an untied unembedding. With
``use_parallel_residual`` (Pythia's default) a layer's MLP reads the layer's input, as its
attention does, and the graph has no edges from a layer's heads to its MLP (``parallel_attn_mlp``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.gpt_neox.modeling_gpt_neox import rotate_half

from edgeprune.engine.adapters._norm_project import layer_norm_project
from edgeprune.engine.adapters.base import Adapter, GradInto, linear_out_heads


class GPTNeoXAdapter(Adapter):
    """Adapter over a Hugging Face ``GPTNeoXForCausalLM``."""

    arch = "gpt_neox"
    has_pos = False

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        config = module.config
        self.body = module.gpt_neox
        self.n_layers = config.num_hidden_layers
        self.n_heads = self.n_kv_heads = config.num_attention_heads
        self.d_model = config.hidden_size
        self.head_dim = self.d_model // self.n_heads
        self.vocab_size = config.vocab_size
        self.input_vocab_size = self.body.embed_in.num_embeddings
        self.parallel_attn_mlp = bool(config.use_parallel_residual)

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.body.embed_in(input_ids)[None]  # [1, B, T, D]

    def _heads(
        self, layer: int, x: torch.Tensor, parts: slice, grad_into: GradInto | None
    ) -> torch.Tensor:
        """Per-reader LayerNorm and projection by the q (``parts`` 0:1), or k and v (1:3), heads
        of query_key_value: x [R, B, T, D] -> [B, R, T, K], readers part-major (every k head,
        then every v head)."""
        layer_ = self.body.layers[layer]
        qkv = layer_.attention.query_key_value
        H, K, D = self.n_heads, self.head_dim, self.d_model
        # weight [3D, D] -> [H, 3, K, D] -> the parts' heads [R, K, D] (a copy of a few rows)
        w = qkv.weight.view(H, 3, K, D)[:, parts].transpose(0, 1).reshape(-1, K, D)
        b = None
        if qkv.bias is not None:
            b = qkv.bias.view(H, 3, K)[:, parts].transpose(0, 1).reshape(-1, K)  # [R, K]
        # the norm's scale applied after the projection
        return layer_norm_project(x, layer_.input_layernorm, w, b, grad_into)  # [B, R, T, K]

    def _rotate(self, t: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Partial rotary embedding, as the model's ``apply_rotary_pos_emb``: the first
        ``rotary_ndims`` dimensions of every head turn, the rest pass: t [B, R, T, K]."""
        cos, sin = self.body.rotary_emb(t, position_ids)  # [B|1, T, Kr] each
        cos, sin = cos[:, None], sin[:, None]  # [B|1, 1, T, Kr]
        r = cos.shape[-1]
        turned, kept = t[..., :r], t[..., r:]  # [B, R, T, Kr], [B, R, T, K - Kr]
        return torch.cat([turned * cos + rotate_half(turned) * sin, kept], dim=-1)

    def queries(self, layer, x, position_ids, grad_into=None):
        q = self._heads(layer, x, slice(0, 1), grad_into)  # [B, H, T, K]
        return self._rotate(q, position_ids)

    def keys_values(self, layer, x, position_ids, grad_into=None):
        kv = self._heads(layer, x, slice(1, 3), grad_into)  # [B, 2H, T, K]
        k, v = kv.split(self.n_heads, dim=1)  # [B, H, T, K] each
        return self._rotate(k, position_ids), v

    def attn_scale(self, layer: int) -> float:
        return self.body.layers[layer].attention.scaling

    def out_proj(self, layer):
        dense = self.body.layers[layer].attention.dense
        return linear_out_heads(dense, self.n_heads, self.head_dim)  # [H, K, D], [D] | None

    def mlp(self, layer, x):
        layer_ = self.body.layers[layer]
        return layer_.mlp(layer_.post_attention_layernorm(x))  # [..., D] (dropout: eval mode)

    def unembed(self, x):
        return self.module.lm_head(self.body.final_layer_norm(x))  # [..., V]

    def reference_logits(self, input_ids, attention_mask, positions=None):
        # the unembedding only at the positions: [B, P, V] (the whole sequence: [B, T, V])
        keep = 0 if positions is None else positions
        return self.module(
            input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep
        ).logits
