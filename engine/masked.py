"""The masked forward pass, fast: what engine/reference.py specifies, computed with matmuls.

Reader r's input is ``x_r = A_r + sum_{w < n_r} M[r, w] * d_w`` where ``d_w = y_w - y~_w`` is
writer w's output minus its ablation value, ``A_r = sum_{w < n_r} y~_w`` the ablated residual over
r's upstream prefix, and ``M[r, w] = z_wr * z_w`` (edge mask times node mask). All masks 1 gives the
clean residual, all masks 0 the ablated one. The deltas live in one buffer [W, B, T, D] written in
place; readers are mixed by matmuls over their upstream slices, a block of layers at a time (see
:class:`Readers`; the buffer's layout is in _buffer.py, the autograd functions that write and read
it in _autograd.py, the matmuls in _kernels.py).

``masked_forward`` knows nothing of model families: an :class:`~edgeprune.engine.adapters.Adapter`
supplies embeddings, per-head q/k/v, head outputs, MLPs and the unembedding.

Shapes: B batch, T tokens, W writers, R readers, H query heads, KV key/value heads, K head width,
D model width, E edges, V vocab, N answer positions.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from edgeprune.engine import _checks
from edgeprune.engine._autograd import mix, prefix, read, write, write_heads
from edgeprune.engine._buffer import DeltaBuffer, GradInto
from edgeprune.engine._checks import Mask
from edgeprune.engine._kernels import head_outputs
from edgeprune.engine.adapters import Adapter, adapter_for
from edgeprune.engine.errors import InvalidArgument
from edgeprune.engine.graph import Graph, ReaderGroup
from edgeprune.engine.workspace import Workspace


def attention_mask_4d(valid: torch.Tensor, *, causal: bool, window: int | None) -> torch.Tensor:
    """Which keys each query attends to: valid [B, T] (bool, right padding) -> [B, 1, T, T].

    Padded queries attend to every key, so no row is empty (an empty row would give NaN, which the
    mixing would spread); their outputs are never read by real tokens.
    """
    T = valid.shape[1]
    allowed = valid[:, None, None, :]  # [B, 1, 1, T]
    q = torch.arange(T, device=valid.device)[:, None]  # [T, 1]
    k = torch.arange(T, device=valid.device)[None, :]  # [1, T]
    if causal:
        allowed = allowed & (k <= q)  # [B, 1, T, T]
    if window is not None:
        allowed = allowed & (k > q - window)  # [B, 1, T, T]
    return allowed | ~valid[:, None, :, None]  # [B, 1, T, T]


def layer_masks(adapter: Adapter, valid: torch.Tensor) -> Callable[[int], torch.Tensor]:
    """Each layer's attention mask [B, 1, T, T] for padding ``valid`` [B, T], built once per
    sliding window (see :func:`attention_mask_4d`)."""
    masks: dict[int | None, torch.Tensor] = {}

    def mask(layer: int) -> torch.Tensor:
        window = adapter.sliding_window(layer)
        if window not in masks:
            masks[window] = attention_mask_4d(valid, causal=adapter.causal, window=window)
        return masks[window]

    return mask


def block_layers(n_layers: int) -> int:
    """Layers per mixing block: about sqrt(L) balances prefix reads against in-block reads."""
    return max(1, round(math.sqrt(n_layers)))


def _block_prefix(
    graph: Graph, weights: torch.Tensor, start: int, stop: int, answer_layer: int | None
) -> torch.Tensor:
    """Mixing weights of the readers of layers start..stop-1 over the writers before ``start``:
    [R_blk, n], reader groups in order (each layer's attention readers, then its MLP reader; of
    ``answer_layer``, read at the answer positions only, just its key and value readers)."""
    first = graph.layer_start(start)
    rows = []
    for layer in range(start, stop):
        m = _group_weights(weights, graph.attn_group(layer))[:, :first]  # [H + 2KV, n]
        if layer == answer_layer:
            rows.append(m[graph.n_heads :])
            continue
        rows += [m, _group_weights(weights, graph.mlp_group(layer))[:, :first]]
    return torch.cat(rows)


def _group_weights(weights: torch.Tensor, group: ReaderGroup) -> torch.Tensor:
    """A reader group's mixing weights over its upstream writers: [R, writers upstream]."""
    return weights[group.edges].view(-1, group.n_upstream)


def _difference(total: torch.Tensor | None, part: torch.Tensor | None) -> torch.Tensor | None:
    """``total - part`` of two running sums of ablation values; None where there are none."""
    if total is None or total is part:
        return None
    return total if part is None else total - part


def attention_heads(
    adapter: Adapter,
    layer: int,
    x_q: torch.Tensor,
    x_kv: torch.Tensor,
    position_ids: torch.Tensor,
    mask: torch.Tensor,
    answer_rows: tuple[torch.Tensor, torch.Tensor] | None = None,
    grad_into: tuple[GradInto | None, GradInto | None] = (None, None),
) -> torch.Tensor:
    """One layer's attention from its q/k/v readers' inputs to its heads' outputs before the output
    projection, a pure function: x_q [H, B, T, D], x_kv [2KV, B, T, D], position_ids [1, T],
    mask [B, 1, T, T] -> z [B, H, T, K].

    With ``answer_rows`` (the example and the token of N rows, [N] each; see :class:`AnswerRows`)
    the queries are taken there only: x_q [H, N, D] -> z [1, H, N, K], every answer row one
    single-query attention over its example's keys. ``grad_into``: where the gradients of x_q and
    x_kv may be written during the backward pass (see ``GradInto``), or None.
    """
    q_grad_into, kv_grad_into = grad_into
    k, v = adapter.keys_values(layer, x_kv, position_ids, grad_into=kv_grad_into)
    # k, v [B, KV, T, K]
    if answer_rows is None:
        q = adapter.queries(layer, x_q, position_ids, grad_into=q_grad_into)  # [B, H, T, K]
        return _attend(adapter, layer, q, k, v, mask)  # [B, H, T, K]
    b, t = answer_rows
    at = position_ids.expand(x_kv.shape[1:3])[b, t]  # [N]
    q = adapter.queries(layer, x_q[:, None], at[None], grad_into=q_grad_into)  # [1, H, N, K]
    q = q[0].transpose(0, 1)[:, :, None]  # [N, H, 1, K]
    z = _attend(adapter, layer, q, k[b], v[b], mask[b, :, t][:, :, None])  # [N, H, 1, K]
    return z.transpose(0, 2)  # [1, H, N, K]


def _attend(
    adapter: Adapter, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Scaled dot-product attention: q [B, H, Tq, K], k and v [B, KV, T, K], mask [B, 1, Tq, T]
    -> [B, H, Tq, K]."""
    cap = adapter.attn_softcap(layer)
    if cap is not None:
        return softcapped_attention(q, k, v, mask, adapter.attn_scale(layer), cap)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=adapter.attn_scale(layer),
        enable_gqa=adapter.n_heads != adapter.n_kv_heads,
    )


def softcapped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, cap: float
) -> torch.Tensor:
    """Attention whose logits are soft-capped, ``tanh(s / cap) * cap`` before the mask (which the
    fused kernel cannot do, so the scores are formed here): shapes as :func:`_attend`.

    Query heads are grouped by their key/value head (head h uses KV head h // (H / KV)), so keys
    and values are never repeated per query head.
    """
    B, H, Tq, K = q.shape
    KV = k.shape[1]
    qg = q.view(B, KV, H // KV, Tq, K)  # [B, KV, G, Tq, K]
    scores = qg @ k[:, :, None].transpose(-1, -2) * scale  # [B, KV, G, Tq, T]
    scores = torch.tanh(scores / cap) * cap
    scores = scores.masked_fill(~mask[:, :, None], float("-inf"))  # mask [B, 1, 1, Tq, T]
    probs = scores.softmax(-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
    return (probs @ v[:, :, None]).view(B, H, Tq, K)  # [B, H, Tq, K]


def head_shares(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Every head's output ``z_h @ W_O[h] + b_O / H`` as a differentiable tensor (for a norm to
    follow; ``write_heads`` computes it straight into the buffer otherwise): z [B, H, T, K],
    weight [H, K, D], bias [D] or None -> [H, B, T, D]."""
    y = torch.einsum("bhtk,hkd->hbtd", z, weight)  # [H, B, T, D]
    return y if bias is None else y + bias / z.shape[1]


def _call(fn: Callable[..., torch.Tensor], *args: object, recompute: bool) -> torch.Tensor:
    """``fn(*args)``; with ``recompute`` its intermediates are not kept but recomputed during the
    backward pass (activation checkpointing; ``fn`` must be pure)."""
    if not (recompute and torch.is_grad_enabled()):
        return fn(*args)
    # a frozen model in eval mode draws no random numbers: no RNG state to preserve
    return torch.utils.checkpoint.checkpoint(
        fn, *args, use_reentrant=False, preserve_rng_state=False
    )


class AttentionInputs(NamedTuple):
    """One layer's attention readers' inputs, and what :func:`attention_heads` takes with them."""

    q: torch.Tensor  # [H, B, T, D], or [H, N, D] at the answer rows
    kv: torch.Tensor  # [2KV, B, T, D]
    grad_into: tuple[GradInto | None, GradInto | None]  # where their gradients may go
    answer_rows: tuple[torch.Tensor, torch.Tensor] | None  # see AnswerRows


class AnswerRows:
    """The answer-row path: only the logits at the N answer rows (``index``) are wanted.

    Then the last layer's writers are read by the logits reader alone, at those rows: that
    layer's query readers, heads, MLP reader and MLP run at the answer rows only (its key and
    value readers over the whole batch, since every answer row attends to its example's keys),
    and its writers live in the buffer's ``d_at_index`` alone. Readers here read every writer
    before them in one mix at the answer rows.
    """

    def __init__(self, buf: DeltaBuffer, graph: Graph, layer: int) -> None:
        self.buf, self.layer = buf, layer
        buf.index_only = graph.layer_start(layer)

    @property
    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The example and the token of every answer row, [N] each."""
        return self.buf.answer_rows

    def mix(self, token: torch.Tensor, m: torch.Tensor, *, last: bool = False) -> torch.Tensor:
        """Readers' inputs A_r + sum_w M[r, w] d_w at the answer rows: m [R, n] -> [R, N, D]."""
        buf = self.buf
        return mix(buf, token, m, buf.at_index(buf.ablated_sum), at_index=True, last=last)


class Readers:
    """Every reader's input ``x_r = A_r + sum_w M[r, w] * d_w``, formed a block of layers at a time.

    At the first layer of every block of ``block_layers(L)`` layers, one matmul mixes the whole
    block's readers over the writers before the block (so that prefix of the buffer is read once
    per block, not once per layer); each reader group then adds the block's writers before it.
    A_r, the ablated residual, comes in the same parts: the running sum of the ablation values of
    the writers before the block, then of those inside it.
    """

    def __init__(self, buf: DeltaBuffer, graph: Graph, weights: torch.Tensor,
                 answers: AnswerRows | None) -> None:
        self.buf, self.graph, self.weights, self.answers = buf, graph, weights, answers
        self.H, self.KV = graph.n_heads, graph.n_kv_heads
        self.size = block_layers(graph.n_layers)

    def _at_answers(self, layer: int) -> bool:
        return self.answers is not None and layer == self.answers.layer

    def _start_block(self, token: torch.Tensor, layer: int) -> None:
        """Mix the readers of the block starting at ``layer`` over the writers before it."""
        g, R_attn = self.graph, self.H + 2 * self.KV
        answer_layer = None if self.answers is None else self.answers.layer
        stop = min(g.n_layers, layer + self.size)
        m = _block_prefix(g, self.weights, layer, stop, answer_layer)  # [R_blk, first]
        self.first = g.layer_start(layer)  # writers before the block
        self.block_base = self.buf.ablated_sum  # [B|1, T, D] or None (zero ablation)
        self.block, self.block_token = prefix(
            self.buf, token, m, self.block_base, self.size * (R_attn + 1)
        )

    def _read(self, token: torch.Tensor, m: torch.Tensor, row: int, start: int,
              since: torch.Tensor | None, returned: tuple[int, ...] | None = None
              ) -> tuple[torch.Tensor, ...]:
        """Add the writers ``start..`` inside the block (m [R, n]; their ablation values: the
        running sum less ``since``) to the block's rows ``row..``."""
        base = _difference(self.buf.ablated_sum, since)
        return read(self.buf, token, self.block, self.block_token, m, row=row, start=start,
                    returned=returned, base=base)

    def attention(self, token: torch.Tensor, layer: int) -> AttentionInputs:
        """The inputs of layer ``layer``'s query, key and value readers."""
        if layer % self.size == 0:
            self._start_block(token, layer)
        H, KV, g, first = self.H, self.KV, self.graph, self.first
        self.row = (layer % self.size) * (H + 2 * KV + 1)  # the layer's rows in the block
        heads = g.layer_start(layer)
        m_attn = _group_weights(self.weights, g.attn_group(layer))  # [H + 2KV, heads]
        self.m_mlp = _group_weights(self.weights, g.mlp_group(layer))  # [1, heads + H]
        parallel = g.parallel_attn_mlp  # the MLP reader is finished here: it reads no heads
        if self._at_answers(layer):
            # keys and values in the block; queries (and a parallel MLP reader) over every
            # writer before the layer, there
            (x_kv,) = self._read(token, m_attn[H:, first:], self.row, first, self.block_base)
            m = torch.cat([m_attn[:H], self.m_mlp]) if parallel else m_attn[:H]
            x_q = self.answers.mix(token, m)  # [H(+1), N, D]
            x_q, self.x_mlp = x_q[:H], x_q[H:, None]  # [H, N, D], [1 | 0, 1, N, D]
            grad_into = (None, GradInto(self.block, self.row, 2 * KV))
            rows = self.answers.rows
        else:
            # the q/k/v readers and the MLP reader over the block's writers before the layer,
            # in one matmul; the MLP reader adds the layer's heads once they are written
            m = torch.cat([m_attn[:, first:], self.m_mlp[:, first:heads]])
            returned = (H, 2 * KV, 1) if parallel else (H, 2 * KV)
            x_q, x_kv, *x_mlp = self._read(token, m, self.row, first, self.block_base, returned)
            self.x_mlp = x_mlp[0] if parallel else None  # [1, B, T, D]
            grad_into = (GradInto(self.block, self.row, H),
                         GradInto(self.block, self.row + H, 2 * KV))
            rows = None
        self.before_heads = self.buf.ablated_sum
        return AttentionInputs(x_q, x_kv, grad_into, rows)  # x_kv [2KV, B, T, D]

    def mlp(self, token: torch.Tensor, layer: int) -> torch.Tensor:
        """The input of layer ``layer``'s MLP reader (after :meth:`attention` and the heads'
        write): [1, B, T, D], or [1, 1, N, D] at the answer rows."""
        if self.graph.parallel_attn_mlp:
            return self.x_mlp  # read with the layer's attention readers
        if self._at_answers(layer):
            return self.answers.mix(token, self.m_mlp)[:, None]
        heads = self.graph.layer_start(layer)
        (x,) = self._read(token, self.m_mlp[:, heads:], self.row + self.H + 2 * self.KV, heads,
                          self.before_heads)
        return x

    def logits(self, token: torch.Tensor) -> torch.Tensor:
        """The logits reader's input over every writer: [B, T, D], or [N, D] at the answer rows."""
        m = _group_weights(self.weights, self.graph.logits_group())  # [1, W]
        if self.answers is not None:
            return self.answers.mix(token, m, last=True)[0]
        return mix(self.buf, token, m, self.buf.ablated_sum, last=True)[0]


def masked_forward(
    adapter: Adapter,
    graph: Graph,
    input_ids: torch.Tensor,
    valid: torch.Tensor,
    weights: torch.Tensor,
    ablated: torch.Tensor | None,
    index: torch.Tensor | None = None,
    *,
    logits: bool = True,
    checkpoint_layers: bool = False,
    workspace: Workspace | None = None,
    embeddings: torch.Tensor | None = None,
    grad_deltas: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, DeltaBuffer]:
    """Logits of the masked model, and the delta buffer.

    Computes exactly what the specification, :func:`edgeprune.engine.reference.reference_forward`,
    computes (every reader's input the mask-weighted sum of its upstream writers' clean and
    ablated outputs), with readers mixed by matmuls over the delta buffer (see :class:`Readers`).

    input_ids [B, T]; valid [B, T] bool; weights [E] (M[r, w] in edge order); ablated [W, B|1, T, D]
    or None (zero ablation); index [N] rows of the flat (B*T) axis to unembed, None for all.
    Returns logits [B, T, V] (or [N, V]; None when ``logits`` is False) and the buffer, whose ``d``
    holds every writer's output minus its ablation value. With an ``index`` (and ``logits``) the
    last layer runs at the answer rows only (see :class:`AnswerRows`).

    With ``checkpoint_layers`` every layer's attention (from its q/k/v readers' inputs to its heads'
    outputs before the output projection) and MLP (from its reader's input to its output) keep
    none of their intermediates for the backward pass, which recomputes them. Both are pure
    functions of their inputs, which live in the block's reader inputs until the backward pass is
    done with them; the buffer's writes and reads stay outside.

    ``workspace`` lends the buffer and the blocks' reader inputs (see ``Workspace``); it must not be
    given when the caller keeps the returned buffer's ``d``.

    ``embeddings`` [n_embed, B, T, D], when given, are the embedding writers' outputs instead of
    the model's embeddings of ``input_ids`` (which then only give the shape): an input between two
    prompts, as EAP-IG integrates along. ``grad_deltas`` [W, B, T, D], when given, are the deltas
    the gradient of ``weights`` is taken against: dL/dM[r, w] = sum over rows of g_r * delta_w
    (g_r = dL/dx_r) instead of g_r * d_w; the forward and every other gradient are unchanged (see
    _autograd.py). With every mask 1 the forward is the plain model whatever the ablation values,
    and this gives each edge's gradient . delta in one backward, for any delta.
    """
    B, T = input_ids.shape
    H = adapter.n_heads
    position_ids = torch.arange(T, device=input_ids.device)[None]  # [1, T]
    if embeddings is None:
        embeddings = adapter.embed(input_ids, position_ids)  # [n_embed, B, T, D]
    buf = DeltaBuffer(graph.n_writers, B, T, adapter.d_model, like=embeddings,
                      workspace=workspace, index=index, grad_deltas=grad_deltas)  # d [W, B, T, D]
    answers = AnswerRows(buf, graph, adapter.n_layers - 1) if logits and index is not None else None
    readers = Readers(buf, graph, weights, answers)
    mask_of = layer_masks(adapter, valid)

    def ablation(start: int, stop: int) -> torch.Tensor | None:
        return None if ablated is None else ablated[start:stop]  # y~ [n, B|1, T, D]

    token = write(buf, embeddings.new_zeros(()), 0, embeddings, ablation(0, graph.n_embed))
    for layer in range(adapter.n_layers):
        heads = graph.layer_start(layer)  # the layer's writers: heads..heads+H, then its MLP
        # attention: gather its readers' inputs, run it, write its heads' outputs
        x = readers.attention(token, layer)
        attend = functools.partial(
            attention_heads, adapter, layer, position_ids=position_ids, mask=mask_of(layer),
            answer_rows=x.answer_rows, grad_into=x.grad_into,
        )
        z = _call(attend, x.q, x.kv, recompute=checkpoint_layers)  # [B, H, T, K] | [1, H, N, K]
        weight, bias = adapter.out_proj(layer)  # [H, K, D], [D] or None
        if adapter.post_attention_norm:  # each head's share of the normalised layer output
            y = adapter.normalise_heads(layer, head_shares(z, weight, bias))  # [H, B, T, D]
            token = write(buf, token, heads, y, ablation(heads, heads + H))
        else:
            token = write_heads(buf, token, heads, z, weight, bias, ablation(heads, heads + H))
        # MLP: gather its reader's input, run it, write its output
        x_mlp = readers.mlp(token, layer)  # [1, B, T, D] | [1, 1, N, D]
        y = _call(adapter.mlp, layer, x_mlp, recompute=checkpoint_layers)  # x_mlp's shape
        token = write(buf, token, heads + H, y, ablation(heads + H, heads + H + 1))
    if not logits:
        return None, buf
    return adapter.unembed(readers.logits(token)), buf  # [B, T, V] | [N, V]


@torch.no_grad()
def writer_outputs(
    adapter: Adapter,
    graph: Graph,
    input_ids: torch.Tensor,
    valid: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Every writer's output in the model's own (unmasked) run: [W, B, T, D], no grad.

    With every edge kept, every reader's input is the residual stream (the sum of the outputs
    written so far), so this runs the model layer by layer on one residual, writing each head's
    and MLP's output as it goes: no mixing, which the masked forward with all masks 1 would do.
    input_ids [B, T]; valid [B, T] bool; ``out``: a contiguous [W, B, T, D] tensor to write
    into (else a new one).
    """
    B, T = input_ids.shape
    H, KV, D = adapter.n_heads, adapter.n_kv_heads, adapter.d_model
    position_ids = torch.arange(T, device=input_ids.device)[None]  # [1, T]
    emb = adapter.embed(input_ids, position_ids)  # [n_embed, B, T, D]
    if out is None:
        out = emb.new_empty(graph.n_writers, B, T, D)  # [W, B, T, D]
    out[: len(emb)] = emb
    resid = emb.sum(0)  # [B, T, D]
    mask_of = layer_masks(adapter, valid)
    for layer in range(adapter.n_layers):
        heads = graph.layer_start(layer)
        x_q, x_kv = resid.expand(H, B, T, D), resid.expand(2 * KV, B, T, D)  # every reader's input
        z = attention_heads(adapter, layer, x_q, x_kv, position_ids, mask_of(layer))  # [B, H, T, K]
        head_outputs(z, *adapter.out_proj(layer), out[heads : heads + H])  # [H, B, T, D]
        if adapter.post_attention_norm:
            out[heads : heads + H] = adapter.normalise_heads(layer, out[heads : heads + H])
        layer_input = resid
        resid = resid + out[heads : heads + H].sum(0)  # [B, T, D]
        mlp_input = layer_input if graph.parallel_attn_mlp else resid
        out[heads + H] = adapter.mlp(layer, mlp_input)  # [B, T, D]
        resid = resid + out[heads + H]
    return out


class CircuitModel(nn.Module):
    """A frozen language model whose every edge can be masked between clean and ablated values.

    ``CircuitModel(module, tokenizer)`` takes a Hugging Face causal LM of a family in
    ``edgeprune.engine.adapters.ADAPTERS`` or an ``edgeprune.engine.tracr_model.TracrModel``. The
    module's weights are frozen and used in place. docs/architecture.md gives the graph's names
    and the mask and ablation conventions.

    ``checkpoint_layers`` (also settable, or on for a ``with model.checkpointing():`` block) trades
    compute for memory: every layer's attention and MLP intermediates are recomputed during the
    backward pass instead of kept (see :func:`masked_forward`); results are unchanged.
    """

    def __init__(
        self,
        module: nn.Module,
        tokenizer: object = None,
        *,
        name: str = "",
        checkpoint_layers: bool = False,
    ) -> None:
        super().__init__()
        self.adapter = adapter_for(module)  # UnsupportedArchitecture for unknown families
        module.eval()
        module.requires_grad_(False)
        self.module = module
        self.tokenizer = tokenizer
        self.name = name
        a = self.adapter
        self.arch = a.arch
        self.n_layers, self.n_heads, self.n_kv_heads = a.n_layers, a.n_heads, a.n_kv_heads
        self.d_model, self.vocab_size = a.d_model, a.vocab_size
        self.graph = Graph.build(a.n_layers, a.n_heads, a.n_kv_heads, a.has_pos,
                                 a.parallel_attn_mlp)
        self.checkpoint_layers = checkpoint_layers
        # the big tensors of a masked forward, reused by the next one (release_workspace frees them)
        self.workspace = Workspace()

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def release_workspace(self) -> None:
        """Free the memory kept between masked forwards (it is taken again by the next one)."""
        self.workspace.clear()

    @contextlib.contextmanager
    def checkpointing(self, enabled: bool = True) -> Iterator[None]:
        """Checkpoint layers inside the ``with`` block when ``enabled`` (or already on)."""
        previous = self.checkpoint_layers
        self.checkpoint_layers = previous or enabled
        try:
            yield
        finally:
            self.checkpoint_layers = previous

    # ---- public API ------------------------------------------------------------------------

    def logits(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        corrupted_ids: torch.Tensor | None = None,
        edge_mask: Mask = None,
        node_mask: Mask = None,
        ablation: str = "corrupted",
        ablated: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        embeddings: torch.Tensor | None = None,
        grad_deltas: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of the masked model: [B, T, V], or [B, V] / [B, P, V] at ``positions`` [B] / [B, P].

        Masks are None (all 1), a dict {name: value} (absent names are 1) or a dense tensor ([E] for
        edges, [W] for nodes, graph order); the result is differentiable w.r.t. dense masks. The
        ablation values y~ are ``ablated`` [W, B|1, T, D] when given, else the corrupted run's writer
        outputs (``corrupted_ids`` [B, T], same attention mask), zero, or the per-position mean over
        the batch (``corrupted_ids`` if given, else ``input_ids``).

        ``embeddings`` [n_embed, B, T, D] replace the embedding writers' outputs on ``input_ids``
        (differentiable); ``grad_deltas`` [W, B, T, D] are the writer deltas the dense masks'
        gradient is taken against instead of y - y~ (see :func:`masked_forward`: with every mask
        1 the edge mask's gradient is then g_r . grad_deltas_w for each edge w -> r).
        """
        ids, valid = self._check_batch(input_ids, attention_mask)
        ablation = _checks.check_ablation(ablation)
        B, T = ids.shape
        index = _checks.check_positions(positions, B, T)
        index = None if index is None else index.to(self.device)
        weights = self._edge_weights(edge_mask, node_mask)  # [E]
        y_tilde = self._ablation_values(
            ids, valid, attention_mask, corrupted_ids, ablation, ablated
        )
        like = torch.empty((), device=self.device, dtype=self.dtype)
        if embeddings is not None:
            embeddings = _checks.check_activations(
                embeddings, (self.graph.n_embed, B, T, self.d_model), like=like, field="embeddings"
            )  # [n_embed, B, T, D]
        if grad_deltas is not None:
            grad_deltas = _checks.check_activations(
                grad_deltas, (self.graph.n_writers, B, T, self.d_model), like=like,
                field="grad_deltas",
            ).detach()  # [W, B, T, D]
        out, _ = masked_forward(
            self.adapter,
            self.graph,
            ids,
            valid,
            weights,
            y_tilde,
            index,
            checkpoint_layers=self.checkpoint_layers,
            workspace=self.workspace,
            embeddings=embeddings,
            grad_deltas=grad_deltas,
        )
        assert out is not None
        if positions is None:
            return out  # [B, T, V]
        return out.view(*positions.shape, -1)  # [B, V] | [B, P, V]

    @torch.no_grad()
    def ablation_outputs(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Every writer's output in the plain (unmasked) run on these ids: [W, B, T, D], no grad;
        written into ``out`` (a contiguous tensor of that shape, the model's dtype and device)
        when given, which a loop can reuse instead of mapping fresh memory every call."""
        ids, valid = self._check_batch(input_ids, attention_mask)
        if out is not None:
            out = _checks.check_out(out, (self.graph.n_writers, *ids.shape, self.d_model),
                                    dtype=self.dtype, device=self.device, field="out")
        return writer_outputs(self.adapter, self.graph, ids, valid, out)  # [W, B, T, D]

    @torch.no_grad()
    def mean_ablation(
        self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-position mean of every writer's output over the examples, pads excluded: [W, 1, T, D]."""
        outputs = self.ablation_outputs(input_ids, attention_mask=attention_mask)  # [W, B, T, D]
        _, valid = self._check_batch(input_ids, attention_mask)
        weight = valid.to(outputs.dtype)[None, :, :, None]  # [1, B, T, 1]
        count = weight.sum(1, keepdim=True).clamp(min=1)  # [1, 1, T, 1]
        return (outputs * weight).sum(1, keepdim=True) / count  # [W, 1, T, D]

    @torch.no_grad()
    def reference_logits(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The original module's logits: [B, T, V], or at ``positions`` as in :meth:`logits`."""
        ids, valid = self._check_batch(input_ids, attention_mask)
        B, T = ids.shape
        if _checks.check_positions(positions, B, T) is None:
            return self.adapter.reference_logits(ids, valid.long())  # [B, T, V]
        assert positions is not None
        at = positions.to(self.device).long().reshape(B, -1)  # [B, P]
        out = self.adapter.reference_logits(ids, valid.long(), at)  # [B, P, V]
        return out.view(*positions.shape, -1)  # [B, V] | [B, P, V]

    # ---- helpers -----------------------------------------------------------------------------

    def _check_batch(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated ids [B, T] (long) and padding mask [B, T] (bool) on the model's device."""
        a = self.adapter
        ids = _checks.check_ids(
            input_ids,
            "input_ids",
            vocab=a.input_vocab_size,
            max_len=a.max_positions,
            device=self.device,
        )
        return ids, _checks.check_attention_mask(attention_mask, ids.shape, self.device)

    def _edge_weights(self, edge_mask: Mask, node_mask: Mask) -> torch.Tensor:
        """Effective edge weights M = z_wr * z_w, dense [E] in the model's dtype.

        The product is taken in at least float32 and rounded to the model's dtype once, so a bf16
        model sees the masks as closely as bf16 allows; gradients flow back through the casts to
        the masks in their own dtype (float32 log-alphas stay float32).
        """
        precise = torch.promote_types(self.dtype, torch.float32)
        like = torch.empty((), device=self.device, dtype=precise)
        g = self.graph
        edges = _checks.dense_mask(edge_mask, g.n_edges, g.edge_index, "edge_mask", like)  # [E]
        nodes = _checks.dense_mask(node_mask, g.n_writers, g.writer_index, "node_mask", like)  # [W]
        if edges is None:
            edges = torch.ones(g.n_edges, device=self.device, dtype=precise)  # [E]
        if nodes is not None:
            edges = edges * nodes[g.edge_writer.to(self.device)]  # [E]
        return edges.to(self.dtype)  # [E]

    def _ablation_values(
        self,
        ids: torch.Tensor,
        valid: torch.Tensor,
        attention_mask: torch.Tensor | None,
        corrupted_ids: torch.Tensor | None,
        ablation: str,
        ablated: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """y~ [W, B|1, T, D] for this batch (None for zero ablation)."""
        B, T = ids.shape
        if ablation == "zero":
            if ablated is not None:
                raise InvalidArgument(
                    "ablated values make no sense with ablation='zero'", field="ablated"
                )
            return None
        if corrupted_ids is not None:
            if not isinstance(corrupted_ids, torch.Tensor) or corrupted_ids.shape != ids.shape:
                raise InvalidArgument(
                    f"corrupted_ids must have the shape of input_ids {tuple(ids.shape)}",
                    field="corrupted_ids",
                )
            corrupted_ids = _checks.check_ids(
                corrupted_ids,
                "corrupted_ids",
                vocab=self.adapter.input_vocab_size,
                max_len=None,
                device=self.device,
            )
        if ablated is not None:
            like = torch.empty((), device=self.device, dtype=self.dtype)
            return _checks.check_ablated(
                ablated,
                writers=self.graph.n_writers,
                batch=B,
                tokens=T,
                width=self.d_model,
                like=like,
            )
        if ablation == "mean":
            source = ids if corrupted_ids is None else corrupted_ids
            return self.mean_ablation(source, attention_mask=valid.long())  # [W, 1, T, D]
        if corrupted_ids is None:
            raise InvalidArgument(
                "ablation='corrupted' needs corrupted_ids or precomputed ablated values",
                field="corrupted_ids",
            )
        return self.ablation_outputs(corrupted_ids, attention_mask=valid.long())  # [W, B, T, D]
