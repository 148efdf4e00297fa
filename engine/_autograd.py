"""The autograd functions that fill the writer-delta buffer and read readers' inputs from it.

The masked forward keeps every writer's delta ``d_w = y_w - y~_w`` in one preallocated buffer
(see _buffer.py) filled in place, and forms readers' inputs ``x_r = A_r + sum_w M[r, w] * d_w``
with matmuls over their upstream rows. Plain autograd cannot follow in-place writes into one
buffer, so:

* ``write`` stores a block of writer outputs minus their ablation values (``write_heads`` computes
  attention heads' outputs straight into the buffer); its backward hands those writers the
  gradient accumulated for them.
* ``mix`` computes readers' inputs ``A + M @ d[:n]``; its backward returns dL/dM = dL/dx @ d^T and
  accumulates ``M^T @ dL/dx`` into the writers' gradient.
* ``prefix`` and ``read`` do the same in two steps for a block of layers (see ``Block``).

Ordering: every write and read takes the previous write's output *token* (a 0-d tensor) as an
input, so the autograd engine runs a writer's ``write`` backward only after the backward of every
read that came later in the forward, i.e. after every reader of that writer has accumulated its
gradient. The rows ``d[a:b]`` a read used are never overwritten afterwards (writes only append),
so reads need not save them.

The backward reads the buffer's deltas only to form dL/dM, so a buffer given other
``grad_deltas`` (EAP-IG's clean-minus-corrupted outputs, say) yields the gradient of the masks
against those instead, at no cost, while every other gradient stays that of the forward that ran.
"""

from __future__ import annotations

import torch
from torch.autograd.function import FunctionCtx

from edgeprune.engine._buffer import Block, DeltaBuffer
from edgeprune.engine._kernels import (
    alias,
    head_outputs,
    head_outputs_grad,
    mask_gradient,
    matmul_into,
    same_memory,
)


def _with_base(buf: DeltaBuffer, m: torch.Tensor, start: int,
               base: torch.Tensor | None) -> torch.Tensor:
    """Mixing weights over ``d[start : start+n]`` -> over those rows plus one carrying ``base``.

    With a base [B|1, T, D], it is written into row ``start+n`` of the buffer (a writer not yet
    written, whose own write overwrites it) and ``m`` [R, n] gets a column of ones, so that one
    matmul forms ``base + m @ d[start : start+n]``: [R, n + 1]. Without one, ``m`` itself.
    """
    if base is None:
        return m
    buf.d[start + m.shape[1]].copy_(base)  # [B, T, D]
    return torch.cat([m.detach(), m.new_ones(m.shape[0], 1)], 1)  # [R, n + 1]


def _zero(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=like.dtype, device=like.device)


class _Write(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        y: torch.Tensor,
        token: torch.Tensor,
        buf: DeltaBuffer,
        start: int,
        ablated: torch.Tensor | None,
    ) -> torch.Tensor:
        # y [n, B, T, D] ([n, 1, N, D] for writers kept at the answer rows only); ablated
        # [n, B or 1, T, D] or None (zero ablation)
        out, subtracted = buf.destination(start, start + y.shape[0], ablated)  # y's shape
        if subtracted is None:
            out.copy_(y)
        else:
            torch.sub(y, subtracted, out=out)
        buf.wrote(start, start + y.shape[0], ablated)
        ctx.buf, ctx.start, ctx.n = buf, start, y.shape[0]  # type: ignore[attr-defined]
        return token.new_zeros(())

    @staticmethod
    def backward(ctx, g_token: torch.Tensor):  # type: ignore[override]
        g_y = None
        if ctx.needs_input_grad[0]:
            g_y = ctx.buf.writer_grad(ctx.start, ctx.start + ctx.n)  # [n, B, T, D]
        return g_y, g_token, None, None, None


class _WriteHeads(torch.autograd.Function):
    """Attention heads' outputs written straight into the buffer: d = z_h @ W_h + b / H - y~."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        z: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        token: torch.Tensor,
        buf: DeltaBuffer,
        start: int,
        ablated: torch.Tensor | None,
    ) -> torch.Tensor:
        # z [B, H, T, K] ([1, H, N, K] for heads kept at the answer rows only); weight [H, K, D]
        # (frozen); bias [D] or None; ablated [H, B|1, T, D]
        H = z.shape[1]
        out, subtracted = buf.destination(start, start + H, ablated)  # [H, B, T, D]
        head_outputs(z, weight, bias, out)
        if subtracted is not None:
            out.sub_(subtracted)
        buf.wrote(start, start + H, ablated)
        ctx.save_for_backward(weight)
        ctx.buf, ctx.start = buf, start  # type: ignore[attr-defined]
        return token.new_zeros(())

    @staticmethod
    def backward(ctx, g_token: torch.Tensor):  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        g_z = None
        if ctx.needs_input_grad[0]:
            g = ctx.buf.writer_grad(ctx.start, ctx.start + weight.shape[0])  # [H, B, T, D]
            g_z = head_outputs_grad(weight, g)  # [B, H, T, K]
        return g_z, None, None, g_token, None, None, None


class _Mix(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        m: torch.Tensor,
        token: torch.Tensor,
        buf: DeltaBuffer,
        base: torch.Tensor | None,
        at_index: bool,
        last: bool,
    ) -> torch.Tensor:
        # m [R, W]; base broadcastable to one reader input
        n = m.shape[1]
        d = buf.rows(n, at_index)  # [n, B, T, D] or [n, N, D]
        x = (m @ d.reshape(n, -1)).view(m.shape[0], *d.shape[1:])  # [R, B, T, D] or [R, N, D]
        if base is not None:
            x += base
        ctx.save_for_backward(m)
        ctx.buf, ctx.at_index, ctx.last = buf, at_index, last  # type: ignore[attr-defined]
        return x

    @staticmethod
    def backward(ctx, g_x: torch.Tensor):  # type: ignore[override]
        (m,) = ctx.saved_tensors
        buf: DeltaBuffer = ctx.buf
        if ctx.last:  # the first backward to run (a graph may be backpropagated twice)
            buf.start_backward()
        n = m.shape[1]
        g_flat = g_x.reshape(m.shape[0], -1)  # [R, B*T*D] or [R, N*D]
        d = buf.against(0, n, ctx.at_index)  # [n, B*T*D] or [n, N*D]
        g_m = mask_gradient(d, g_flat) if ctx.needs_input_grad[0] else None  # [R, n]
        if ctx.at_index:
            buf.accumulate_at_index(m.T, g_flat)  # [n, N*D] += [n, R] @ [R, N*D]
        else:
            buf.accumulate(0, m.T, g_flat)  # [n, B*T*D] += [n, R] @ [R, B*T*D]
        return g_m, _zero(m), None, None, None, None


class _Prefix(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        m: torch.Tensor,
        token: torch.Tensor,
        buf: DeltaBuffer,
        block: Block,
        base: torch.Tensor | None,
    ) -> torch.Tensor:
        # m [R_blk, n] over writers :n; base: sum of their ablation values [B|1, T, D] or None
        m_in = _with_base(buf, m, 0, base)  # [R_blk, n(+1)]
        k = m_in.shape[1]
        matmul_into(m_in, buf.d[:k].view(k, -1), block.x.view(m.shape[0], -1))  # [R_blk, B*T*D]
        ctx.save_for_backward(m)
        ctx.buf, ctx.block = buf, block  # type: ignore[attr-defined]
        return token.new_zeros(())  # the block token: every read of the block takes it

    @staticmethod
    def backward(ctx, g_token: torch.Tensor):  # type: ignore[override]
        # runs after every read of the block (they all take its token): block.grad is complete
        (m,) = ctx.saved_tensors
        buf: DeltaBuffer = ctx.buf
        n = m.shape[1]
        g_x = ctx.block.grad.view(m.shape[0], -1)  # [R_blk, B*T*D]
        d = buf.against(0, n)  # [n, B*T*D]
        g_m = mask_gradient(d, g_x) if ctx.needs_input_grad[0] else None  # [R_blk, n]
        buf.accumulate(0, m.T, g_x)  # [n, B*T*D] += [n, R_blk] @ [R_blk, B*T*D]
        ctx.block.free_grad()
        return g_m, g_token, None, None, None


class _Read(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        m: torch.Tensor,
        token: torch.Tensor,
        block_token: torch.Tensor,
        buf: DeltaBuffer,
        block: Block,
        row: int,
        start: int,
        returned: tuple[int, ...],
        base: torch.Tensor | None,
    ) -> tuple[torch.Tensor, ...]:
        # m [R, n] over writers start..start+n (inside the block); rows row..row+R of the block,
        # of which the first sum(returned) are finished, returned in groups of those sizes (the
        # others are finished by later reads); base: the sum of those writers' ablation values
        # [B|1, T, D] or None
        R = m.shape[0]
        x = block.x[row : row + R]  # [R, B, T, D]
        m_in = _with_base(buf, m, start, base)  # [R, n(+1)]
        k = m_in.shape[1]
        if k:
            matmul_into(m_in, buf.d[start : start + k].view(k, -1), x.view(R, -1), add=True)
        ctx.save_for_backward(m)
        ctx.buf, ctx.block, ctx.row, ctx.start = buf, block, row, start  # type: ignore[attr-defined]
        # Aliases, not views: later reads write other rows of block.x in place, which would bump
        # a view's version counter and invalidate tensors saved from it for the backward. One per
        # group (slices of one output would have autograd assemble their gradients in a zeroed
        # full-size tensor); ``GradInto(block, row, size)`` says where a group's gradient goes.
        outs, offset = [], 0
        for size in returned:
            outs.append(alias(x[offset : offset + size]))  # [size, B, T, D]
            offset += size
        return tuple(outs)

    @staticmethod
    def backward(ctx, *gs: torch.Tensor):  # type: ignore[override]
        (m,) = ctx.saved_tensors
        buf: DeltaBuffer = ctx.buf
        R, n = m.shape
        # rows past the returned ones got their gradient from the later reads that finished them
        g_x = ctx.block.grad[ctx.row : ctx.row + R]  # [R, B, T, D]
        offset = 0
        for g in gs:
            rows = g_x[offset : offset + g.shape[0]]
            if not same_memory(g, rows):  # not already written there (see GradInto)
                rows.copy_(g)  # kept for the block's prefix backward
            offset += g.shape[0]
        g_m = None
        if n:
            g_flat, d = g_x.view(R, -1), buf.against(ctx.start, ctx.start + n)  # [R|n, B*T*D]
            g_m = mask_gradient(d, g_flat) if ctx.needs_input_grad[0] else None  # [R, n]
            buf.accumulate(ctx.start, m.T, g_flat)  # [n, B*T*D] += [n, R] @ [R, B*T*D]
        return g_m, _zero(m), _zero(m), None, None, None, None, None, None


def write(
    buf: DeltaBuffer, token: torch.Tensor, start: int, y: torch.Tensor, ablated: torch.Tensor | None
) -> torch.Tensor:
    """Store ``y - ablated`` [n, B, T, D] at writers ``start .. start+n``; returns the next token."""
    return _Write.apply(y, token, buf, start, ablated)


def write_heads(
    buf: DeltaBuffer,
    token: torch.Tensor,
    start: int,
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ablated: torch.Tensor | None,
) -> torch.Tensor:
    """Store every head's output minus its ablation value at writers ``start .. start+H``:
    ``z[:, h] @ weight[h] + bias / H - ablated[h]`` (z [B, H, T, K], weight [H, K, D] frozen, the
    output projection's bias [D] split evenly over the heads); returns the next token."""
    return _WriteHeads.apply(z, weight, bias, token, buf, start, ablated)


def mix(
    buf: DeltaBuffer,
    token: torch.Tensor,
    m: torch.Tensor,
    base: torch.Tensor | None = None,
    *,
    at_index: bool = False,
    last: bool = False,
) -> torch.Tensor:
    """Readers' inputs ``base + m @ d[:n]``: m [R, n] -> [R, B, T, D], or with ``at_index`` only
    at the buffer's answer rows [R, N, D].

    ``last`` marks the final mix of a forward (the logits reader): its backward runs first and
    resets the gradient buffer.
    """
    return _Mix.apply(m, token, buf, base, at_index, last)


def prefix(
    buf: DeltaBuffer,
    token: torch.Tensor,
    m: torch.Tensor,
    base: torch.Tensor | None = None,
    capacity: int = 0,
) -> tuple[Block, torch.Tensor]:
    """Start a block: ``x = base + m @ d[:n]`` for its readers (m [R_blk, n]; base, the writers'
    summed ablation values [B|1, T, D], or None); returns the block and its token, which every
    :func:`read` of the block must take. ``capacity``: see :class:`Block`."""
    block = Block(m.shape[0], buf, capacity)
    return block, _Prefix.apply(m, token, buf, block, base)


def read(
    buf: DeltaBuffer,
    token: torch.Tensor,
    block: Block,
    block_token: torch.Tensor,
    m: torch.Tensor,
    *,
    row: int,
    start: int,
    returned: tuple[int, ...] | None = None,
    base: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Add ``base + m @ d[start:start+n]`` (m [R, n], writers inside the block; base, their summed
    ablation values [B|1, T, D], or None) to the block's rows ``row..row+R`` and return the first
    ``sum(returned)`` of them (default all), which are finished, in groups of the sizes
    ``returned``: ([size, B, T, D], ...). The other rows must be finished by later reads (whose
    backward runs first and fills their gradient)."""
    returned = (m.shape[0],) if returned is None else returned
    return _Read.apply(m, token, block_token, buf, block, row, start, returned, base)
