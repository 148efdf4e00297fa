"""GPT-2 family adapter (``GPT2LMHeadModel``): LayerNorm, learned positions, fused Conv1D q/k/v.

Conv1D stores weights as [in, out] (y = x @ W + b); c_attn's columns are q | k | v, each
H blocks of K columns, so head h of q is ``W[:, h*K:(h+1)*K]``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers.activations import NewGELUActivation

from edgeprune.engine.adapters._norm_project import layer_norm_project
from edgeprune.engine.adapters.base import Adapter, GradInto


class GPT2Adapter(Adapter):
    """Adapter over a Hugging Face ``GPT2LMHeadModel``."""

    arch = "gpt2"
    has_pos = True

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        config = module.config
        self.body = module.transformer
        self.n_layers = config.n_layer
        self.n_heads = self.n_kv_heads = config.n_head
        self.d_model = config.n_embd
        self.head_dim = self.d_model // self.n_heads
        self.vocab_size = config.vocab_size
        self.input_vocab_size = self.body.wte.num_embeddings
        self.max_positions = config.n_positions
        self._scale_weights = config.scale_attn_weights
        self._scale_by_layer = config.scale_attn_by_inverse_layer_idx

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        tok = self.body.wte(input_ids)  # [B, T, D]
        pos = self.body.wpe(position_ids).expand_as(tok)  # [B, T, D]
        return torch.stack([tok, pos])  # [2, B, T, D]

    def _heads(
        self, layer: int, x: torch.Tensor, part: slice, grad_into: GradInto | None
    ) -> torch.Tensor:
        """Per-reader LayerNorm and projection by heads ``part`` of c_attn (q heads 0..H, k heads
        H..2H, v heads 2H..3H): x [R, B, T, D] -> [B, R, T, K]."""
        block = self.body.h[layer]
        c_attn = block.attn.c_attn
        D, H, K = self.d_model, self.n_heads, self.head_dim
        # c_attn.weight [D, 3D] -> q, k, v heads as [3H, K, D] (a view), c_attn.bias -> [3H, K]
        w = c_attn.weight.view(D, 3 * H, K).permute(1, 2, 0)[part]  # [R, K, D]
        b = c_attn.bias.view(3 * H, K)[part]  # [R, K]
        # the norm's scale applied after the projection
        return layer_norm_project(x, block.ln_1, w, b, grad_into)  # [B, R, T, K]

    def queries(self, layer, x, position_ids, grad_into=None):
        return self._heads(layer, x, slice(0, self.n_heads), grad_into)  # [B, H, T, K]

    def keys_values(self, layer, x, position_ids, grad_into=None):
        H = self.n_heads
        kv = self._heads(layer, x, slice(H, 3 * H), grad_into)  # [B, 2H, T, K]
        return kv.split(H, dim=1)  # k, v [B, H, T, K]

    def attn_scale(self, layer: int) -> float:
        scale = self.head_dim**-0.5 if self._scale_weights else 1.0
        return scale / (layer + 1) if self._scale_by_layer else scale

    def out_proj(self, layer):
        c_proj = self.body.h[layer].attn.c_proj
        return c_proj.weight.view(self.n_heads, self.head_dim, self.d_model), c_proj.bias

    def mlp(self, layer, x):
        block = self.body.h[layer]
        mlp = block.mlp
        if not isinstance(mlp.act, NewGELUActivation):
            return mlp(block.ln_2(x))  # [..., D]
        # gelu_new is the tanh GELU: torch's fused kernel computes it in one pass (HF's in ~8)
        h = F.gelu(mlp.c_fc(block.ln_2(x)), approximate="tanh")  # [..., 4D]
        return mlp.c_proj(h)  # [..., D] (dropout: identity in eval mode)

    def unembed(self, x):
        return self.module.lm_head(self.body.ln_f(x))  # [..., V]

    def reference_logits(self, input_ids, attention_mask, positions=None):
        # the unembedding only at the positions: [B, P, V] (the whole sequence: [B, T, V])
        keep = 0 if positions is None else positions
        return self.module(
            input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep
        ).logits
