"""Gemma adapter (``GemmaForCausalLM``, the first Gemma; Gemma-2 is ``gemma2``).

LLaMA's layout with three differences, all but the first handled by the model's own modules or
by ``_norm_project``:

* the token embeddings are multiplied by sqrt(D), a factor rounded to the model's dtype first (as
  the model does, so bf16 models use 45.25 for sqrt(2048)): transformers 5 does it inside
  ``embed_tokens``, earlier versions in ``GemmaModel.forward``, which the adapter does not call;
* ``GemmaRMSNorm`` scales by (1 + weight) (``OFFSET_RMS_NORMS``);
* a tanh-GELU gated MLP, the head width set by ``head_dim`` and tied embeddings.
"""

from __future__ import annotations

import torch

from edgeprune.engine.adapters.llama import LlamaAdapter


class GemmaAdapter(LlamaAdapter):
    """Adapter over a Hugging Face ``GemmaForCausalLM``."""

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        embed_tokens = self.body.embed_tokens
        tok = embed_tokens(input_ids)  # [B, T, D]
        if not hasattr(embed_tokens, "embed_scale"):  # a plain nn.Embedding: scale as the model
            tok = tok * torch.tensor(self.d_model**0.5, dtype=tok.dtype)
        return tok[None]  # [1, B, T, D]
