"""OLMo adapter (``OlmoForCausalLM``, the first OLMo; OLMo-2 is ``olmo2`` and not supported).

LLaMA's layout with a LayerNorm that has neither weight nor bias (``OlmoLayerNorm``, epsilon
fixed at 1e-5) and, where the config sets ``clip_qkv``, every query, key and value projection
clamped to [-clip_qkv, clip_qkv] before the rotary embedding. The clamp is elementwise, so
clamping each reader's own head projection is what the model does to that head.
"""

from __future__ import annotations

import torch

from edgeprune.engine.adapters._norm_project import plain_layer_norm_project
from edgeprune.engine.adapters.base import GradInto
from edgeprune.engine.adapters.llama import LlamaAdapter

OLMO_NORM_EPS = 1e-5  # OlmoLayerNorm's, fixed in its forward


class OlmoAdapter(LlamaAdapter):
    """Adapter over a Hugging Face ``OlmoForCausalLM``."""

    def _heads(
        self, layer: int, x: torch.Tensor, part: str, grad_into: GradInto | None
    ) -> torch.Tensor:
        w, b = self._projections(layer, part)  # [R, K, D] and [R, K] or None
        out = plain_layer_norm_project(x, OLMO_NORM_EPS, w, b, grad_into)  # [B, R, T, K]
        clip = self.module.config.clip_qkv
        return out if clip is None else out.clamp(-clip, clip)
