"""What the generic masked forward needs from one model family.

An adapter wraps a frozen module and exposes its pieces per layer, on *disentangled* inputs: every
query, key and value reader gets its own residual input, so queries and keys/values come in as
stacks [readers, B, T, D] and are normalised and projected head by head (with views of the module's
own weights, never copies). Queries and keys/values come separately: the last layer's queries may
be taken at the answer positions only. The masked forward in ``edgeprune.engine.masked`` knows
nothing of families.

Shapes: B batch, T tokens, D model width, H query heads, KV key/value heads, K head width, V vocab.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn

# Where a reader input's gradient may be written during the backward pass (see
# ``edgeprune.engine._buffer.GradInto``)
GradInto = Callable[[], torch.Tensor]


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
    # every layer's MLP reads the layer's input, as its attention does, not the attention's output
    # (GPT-NeoX's parallel residual): the graph has no edges from a layer's heads to its MLP
    parallel_attn_mlp: bool = False
    # the layer's attention output is normalised before it joins the residual (Gemma-2): the
    # masked forward passes the heads' outputs through :meth:`normalise_heads`
    post_attention_norm: bool = False

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @abstractmethod
    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Embedding writers' outputs [n_embed, B, T, D] ("tok" then "pos" where there is one)."""

    @abstractmethod
    def queries(
        self, layer: int, x: torch.Tensor, position_ids: torch.Tensor,
        grad_into: GradInto | None = None,
    ) -> torch.Tensor:
        """Per-head queries from the query readers' inputs: x [H, B, T, D], position_ids [1|B, T]
        -> q [B, H, T, K] (normalised, projected, rotary applied where the model has it).

        ``grad_into``, when given, returns during the backward pass a tensor of x's shape where
        x's gradient may be written (and returned), sparing the engine a copy; it may be
        ignored."""

    @abstractmethod
    def keys_values(
        self, layer: int, x: torch.Tensor, position_ids: torch.Tensor,
        grad_into: GradInto | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys and values from the key readers' then the value readers' inputs:
        x [2KV, B, T, D], position_ids [1|B, T] -> k, v [B, KV, T, K] (``grad_into``: as in
        :meth:`queries`)."""

    def attn_scale(self, layer: int) -> float:
        """Factor on q.k in attention logits."""
        return self.head_dim**-0.5

    def sliding_window(self, layer: int) -> int | None:
        """Keys further back than this many positions are masked out (None: no window)."""
        return None

    def attn_softcap(self, layer: int) -> float | None:
        """Attention logits s become ``tanh(s / c) * c`` (after the scale, before the mask) for
        this c; None: no soft-capping (and attention by the fused kernel)."""
        return None

    def normalise_heads(self, layer: int, y: torch.Tensor) -> torch.Tensor:
        """The heads' outputs after the post-attention norm, where ``post_attention_norm``: y
        [H, ..., D] (head h's share z_h @ W_O[h] + b_O / H of the layer's output) -> [H, ..., D],
        each head's share of the normalised layer output, so that they still sum to it."""
        return y

    @abstractmethod
    def out_proj(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention output projection per head: weight [H, K, D] (a view of the module's, head
        h's output is z_h @ weight[h]) and the bias [D] or None, which the masked forward splits
        evenly over the heads so that their outputs still sum to the original layer output."""

    @abstractmethod
    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """MLP writer output from its reader input (norm included): x [..., D] -> [..., D]."""

    @abstractmethod
    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from the final reader input (final norm included): x [..., D] -> [..., V]."""

    @abstractmethod
    def reference_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The original module's own logits [B, T, V], or only at ``positions`` [B, P] (token
        indices per example): [B, P, V]."""


def project_heads(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Project reader r's input with head r's weights: x [R, B, T, D], weight [R, K, D] -> [B, R, T, K].

    ``weight`` [R, K, D] and ``bias`` [R, K] hold one head's projection per reader (see
    :func:`linear_heads`).
    """
    out = torch.einsum("rbtd,rkd->brtk", x, weight)  # [B, R, T, K]
    if bias is not None:
        out = out + bias[None, :, None, :]  # [B, R, T, K]
    return out


def linear_heads(
    projs: tuple[nn.Linear, ...], head_dim: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The heads of several ``nn.Linear`` projections side by side (weights [out, in], head h owning
    rows [h*K, (h+1)*K)): weight [R, K, D] and bias [R, K], zeros for a projection without one, or
    None when none has one. Copies of a few hundred kilobytes per layer, so that one batched matmul
    projects every reader."""
    D = projs[0].in_features
    weight = torch.cat([p.weight.view(-1, head_dim, D) for p in projs])  # [R, K, D]
    if all(p.bias is None for p in projs):
        return weight, None
    bias = torch.cat([
        p.weight.new_zeros(p.out_features // head_dim, head_dim) if p.bias is None
        else p.bias.view(-1, head_dim)
        for p in projs
    ])  # [R, K]
    return weight, bias


def linear_out_heads(
    linear: nn.Linear, heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An ``nn.Linear`` output projection per head (weight [D, H*K], head h owning columns
    [h*K, (h+1)*K)): weight [H, K, D] (a view) and the bias [D] or None, as ``Adapter.out_proj``."""
    weight = linear.weight.view(linear.out_features, heads, head_dim).permute(1, 2, 0)
    return weight, linear.bias
