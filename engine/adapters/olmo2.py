"""OLMo-2 adapter (``Olmo2ForCausalLM``): LLaMA's projections and rotary with the norms moved.

* No norm on a layer's inputs: each reader's input is projected as it is.
* ``q_norm`` and ``k_norm`` are RMSNorms over the queries (keys) of *all* heads of a layer
  together ([H*K], [KV*K]). A reader feeds one head, but that head's normalised query depends on
  every head's projection of the same input: so each reader's input is projected by every head
  ([R, B, T, R*K]), normalised by the model's own norm, and the reader's own head taken. With
  every mask 1 all readers of a layer see the same input and this is the model; it costs R times
  the projection work (and memory) of a per-head norm.
* ``post_attention_layernorm`` normalises the layer's attention output before it joins the
  residual: head h writes its share ``o_h * w / rms(sum_h' o_h')`` (``normalise_heads``, as
  Gemma-2's with weight w instead of 1 + w), so the heads still sum to the layer's output.
* ``post_feedforward_layernorm`` normalises the MLP's output, inside the MLP writer.
"""

from __future__ import annotations

import torch
from torch import nn

from edgeprune.engine.adapters._norm_project import rms_norm_shares
from edgeprune.engine.adapters.base import GradInto, linear_heads, project_heads
from edgeprune.engine.adapters.llama import LlamaAdapter


class Olmo2Adapter(LlamaAdapter):
    """Adapter over a Hugging Face ``Olmo2ForCausalLM``."""

    post_attention_norm = True

    def _own_heads(self, x: torch.Tensor, proj: nn.Linear, norm: nn.Module) -> torch.Tensor:
        """Reader r's head r of ``norm(proj(x[r]))``: x [R, B, T, D] -> [B, R, T, K], the norm
        taken over every head's projection of that reader's input."""
        R, K = x.shape[0], self.head_dim
        full = norm(proj(x))  # [R, B, T, R*K]: every head's (normed) projection of every input
        own = full.unflatten(-1, (R, K)).diagonal(dim1=0, dim2=-2)  # [B, T, K, R]
        return own.permute(0, 3, 1, 2)  # [B, R, T, K]

    def queries(self, layer, x, position_ids, grad_into: GradInto | None = None):
        attn = self.body.layers[layer].self_attn
        return self._rotate(self._own_heads(x, attn.q_proj, attn.q_norm), position_ids)

    def keys_values(self, layer, x, position_ids, grad_into: GradInto | None = None):
        attn = self.body.layers[layer].self_attn
        x_k, x_v = x.split(self.n_kv_heads)  # [KV, B, T, D] each
        k = self._own_heads(x_k, attn.k_proj, attn.k_norm)  # [B, KV, T, K]
        v = project_heads(x_v, *linear_heads((attn.v_proj,), self.head_dim))  # [B, KV, T, K]
        return self._rotate(k, position_ids), v

    def normalise_heads(self, layer: int, y: torch.Tensor) -> torch.Tensor:
        norm = self.body.layers[layer].post_attention_layernorm
        return rms_norm_shares(y, norm.weight, norm.variance_epsilon)  # [H, ..., D]

    def mlp(self, layer, x):
        block = self.body.layers[layer]
        return block.post_feedforward_layernorm(block.mlp(x))  # [..., D]
