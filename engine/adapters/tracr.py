"""Tracr adapter (``edgeprune.engine.tracr_model.TracrModel``): no norms, learned positions,
non-causal attention over all positions with q.k / sqrt(key_size), ReLU MLP, no-bias unembedding.

Each q/k/v/o is an ``nn.Linear`` over H heads of ``key_size`` columns; head h owns
rows [h*K, (h+1)*K) of the q/k/v weights ([H*K, D] in nn.Linear's [out, in] layout) and
columns [h*K, (h+1)*K) of o's weight ([D, H*K]).
"""

from __future__ import annotations

import torch
from torch import nn

from edgeprune.engine.adapters.base import Adapter, output_heads, project_heads


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

    def _heads(self, linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = linear.weight.view(self.n_heads, self.head_dim, self.d_model)  # [H, K, D]
        b = None if linear.bias is None else linear.bias.view(self.n_heads, self.head_dim)  # [H, K]
        return w, b

    def qkv(self, layer, xq, xk, xv, position_ids):
        attn = self.module.layers[layer].attn
        q = project_heads(xq, *self._heads(attn.q))  # [B, H, T, K]
        k = project_heads(xk, *self._heads(attn.k))  # [B, H, T, K]
        v = project_heads(xv, *self._heads(attn.v))  # [B, H, T, K]
        return q, k, v

    def heads_out(self, layer, z):
        o = self.module.layers[layer].attn.o
        w = o.weight.view(self.d_model, self.n_heads, self.head_dim).permute(1, 2, 0)  # [H, K, D]
        return output_heads(z, w, o.bias)  # [H, B, T, D]

    def mlp(self, layer, x):
        mlp = self.module.layers[layer].mlp
        return mlp.fc_out(torch.relu(mlp.fc_in(x)))  # [..., D]

    def unembed(self, x):
        return self.module.unembed(x)  # [..., V]

    def reference_logits(self, input_ids, attention_mask):
        return self.module(input_ids, attention_mask=attention_mask)  # [B, T, V]
