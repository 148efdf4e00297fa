"""Tracr adapter (``edgeprune.engine.tracr_model.TracrModel``): no norms, learned positions,
non-causal attention over all positions with q.k / sqrt(key_size), ReLU MLP, no-bias unembedding.

Each q/k/v/o is an ``nn.Linear`` over H heads of ``key_size`` columns; head h owns
rows [h*K, (h+1)*K) of the q/k/v weights ([H*K, D] in nn.Linear's [out, in] layout) and
columns [h*K, (h+1)*K) of o's weight ([D, H*K]).
"""

from __future__ import annotations

import torch
from torch import nn

from edgeprune.engine.adapters.base import Adapter, linear_heads, linear_out_heads, project_heads


class TracrAdapter(Adapter):
    """Adapter over a compiled Tracr model."""

    arch = "tracr"
    has_pos = True
    causal = False

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        config = module.config
        self.n_layers = config.num_layers
        self.n_heads = self.n_kv_heads = config.num_heads
        self.head_dim = config.key_size
        self.d_model = config.d_model
        self.vocab_size = module.unembed.out_features
        self.input_vocab_size = module.tok_embed.num_embeddings
        self.max_positions = config.max_seq_len
        self.causal = bool(getattr(config, "causal", False))

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        tok = self.module.tok_embed(input_ids)  # [B, T, D]
        pos = self.module.pos_embed(position_ids).expand_as(tok)  # [B, T, D]
        return torch.stack([tok, pos])  # [2, B, T, D]

    def queries(self, layer, x, position_ids, grad_into=None):
        w, b = linear_heads((self.module.layers[layer].attn.q,), self.head_dim)  # [H, K, D]
        return project_heads(x, w, b)  # [B, H, T, K]

    def keys_values(self, layer, x, position_ids, grad_into=None):
        attn = self.module.layers[layer].attn
        w, b = linear_heads((attn.k, attn.v), self.head_dim)  # [2H, K, D], [2H, K] | None
        return project_heads(x, w, b).split(self.n_heads, dim=1)  # k, v [B, H, T, K]

    def out_proj(self, layer):
        o = self.module.layers[layer].attn.o
        return linear_out_heads(o, self.n_heads, self.head_dim)  # [H, K, D], [D] or None

    def mlp(self, layer, x):
        mlp = self.module.layers[layer].mlp
        return mlp.fc_out(torch.relu(mlp.fc_in(x)))  # [..., D]

    def unembed(self, x):
        return self.module.unembed(x)  # [..., V]

    def reference_logits(self, input_ids, attention_mask, positions=None):
        out = self.module(input_ids, attention_mask=attention_mask)  # [B, T, V]
        if positions is None:
            return out
        return torch.take_along_dim(out, positions[..., None], dim=1)  # [B, P, V]
