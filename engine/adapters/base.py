"""What the generic masked forward needs from one model family.

An adapter wraps a frozen module and exposes its pieces per layer, on *disentangled* inputs: every
query, key and value reader gets its own residual input, so q/k/v come in as stacks
[readers, B, T, D] and are normalised and projected head by head (with views of the module's own
weights, never copies). The masked forward in ``edgeprune.engine.masked`` knows nothing of families.

Shapes: B batch, T tokens, D model width, H query heads, KV key/value heads, K head width, V vocab.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn


class Adapter(ABC):
    """One model family's embeddings, per-head attention pieces, MLP and unembedding."""

    arch: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    vocab_size: int
    has_pos: bool
    input_vocab_size: int  # rows of the token embedding
    causal: bool = True
    max_positions: int | None = None  # longest sequence the model accepts, where it has a limit

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @abstractmethod
    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Embedding writers' outputs [n_embed, B, T, D] ("tok" then "pos" where there is one)."""

    @abstractmethod
    def qkv(
        self,
        layer: int,
        xq: torch.Tensor,
        xk: torch.Tensor,
        xv: torch.Tensor,
        position_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head q, k, v from per-reader residual inputs.

        xq [H, B, T, D], xk and xv [KV, B, T, D] -> q [B, H, T, K], k and v [B, KV, T, K]
        (normalised, projected, rotary applied where the model has it).
        """

    def attn_scale(self, layer: int) -> float:
        """Factor on q.k in attention logits."""
        return self.head_dim**-0.5

    def sliding_window(self, layer: int) -> int | None:
        """Keys further back than this many positions are masked out (None: no window)."""
        return None

    @abstractmethod
    def heads_out(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """Each head's contribution to the residual: z [B, H, T, K] -> [H, B, T, D].

        An output-projection bias (one vector for the whole layer) is split evenly over the heads, so
        the heads' outputs still sum to the original layer output.
        """

    @abstractmethod
    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """MLP writer output from its reader input (norm included): x [..., D] -> [..., D]."""

    @abstractmethod
    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from the final reader input (final norm included): x [..., D] -> [..., V]."""

    @abstractmethod
    def reference_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The original module's own logits [B, T, V]."""


def project_heads(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Project reader r's input with head r's weights: x [R, B, T, D], weight [R, K, D] -> [B, R, T, K].

    ``weight`` and ``bias`` [R, K] are views of the module's projection (one per head, no copies).
    """
    out = torch.einsum("rbtd,rkd->brtk", x, weight)  # [B, R, T, K]
    if bias is not None:
        out = out + bias[None, :, None, :]  # [B, R, T, K]
    return out


def output_heads(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Each head's output: z [B, H, T, K], weight [H, K, D] -> [H, B, T, D]; bias [D] split over heads."""
    B, H, T, K = z.shape
    z_h = z.transpose(0, 1).reshape(H, B * T, K)  # [H, B*T, K]
    if bias is None:
        out = torch.bmm(z_h, weight)  # [H, B*T, D]
    else:  # the bias added by the matmul: no separate full-width pass
        out = torch.baddbmm((bias / H).view(1, 1, -1), z_h, weight)  # [H, B*T, D]
    return out.view(H, B, T, -1)  # [H, B, T, D]
