"""Gemma-2 adapter (``Gemma2ForCausalLM``): Gemma's layout (embeddings scaled by sqrt(D), RMSNorm
by (1 + weight), tanh-GELU gated MLP) plus

* a post-attention norm of the layer's attention output before it joins the residual. The heads
  stay separate writers: head h writes its share of the normalised output,
  ``o_h * (1 + w) / rms(sum_h' o_h')`` with ``o_h = z_h @ W_O[h] (+ b_O / H)``, the rms taken
  over the layer's whole output in this run. That is linear in each head's output with one
  layer-wide scale, so the heads still sum to the layer's output (masks 1: the model; masks 0:
  the corrupted run) (``normalise_heads``);
* pre- and post-feed-forward norms around the MLP, both inside the MLP writer;
* attention-logit soft-capping ``tanh(s / c) * c`` (``attn_softcap``) and final-logit
  soft-capping in :meth:`unembed`;
* sliding windows on alternate layers (the attention module's own ``sliding_window``) and the
  attention scale ``query_pre_attn_scalar ** -0.5`` (its ``scaling``), both read by LlamaAdapter.
"""

from __future__ import annotations

import torch

from edgeprune.engine.adapters._norm_project import rms_norm_shares
from edgeprune.engine.adapters.gemma import GemmaAdapter


class Gemma2Adapter(GemmaAdapter):
    """Adapter over a Hugging Face ``Gemma2ForCausalLM``."""

    post_attention_norm = True

    def attn_softcap(self, layer: int) -> float | None:
        return self.body.layers[layer].self_attn.attn_logit_softcapping

    def normalise_heads(self, layer: int, y: torch.Tensor) -> torch.Tensor:
        norm = self.body.layers[layer].post_attention_layernorm
        # the scale 1 + w in at least float32, as the model's norm forms it
        scale = 1 + norm.weight.to(torch.promote_types(norm.weight.dtype, torch.float32))  # [D]
        return rms_norm_shares(y, scale, norm.eps)  # [H, ..., D]

    def mlp(self, layer, x):
        block = self.body.layers[layer]
        h = block.mlp(block.pre_feedforward_layernorm(x))  # [..., D]
        return block.post_feedforward_layernorm(h)

    def unembed(self, x):
        logits = super().unembed(x)  # [..., V]
        cap = self.module.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap
