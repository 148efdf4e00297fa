"""The writer-delta buffer and the autograd functions that fill and read it.

The masked forward keeps every writer's delta ``d_w = y_w - y~_w`` in one preallocated buffer
[W, B, T, D] filled in place, and mixes readers with matmuls over their upstream slices. Plain
autograd cannot follow in-place writes into one buffer, so:

* ``write`` copies a block of writer outputs into the buffer; its backward hands those writers the
  gradient accumulated for them in the gradient buffer.
* ``mix`` computes readers' inputs ``base + M @ d[:n]``; its backward returns dL/dM and accumulates
  ``M^T @ dL/dx`` into the gradient buffer.
* ``prefix`` and ``read`` do the same in two steps for a block of layers (see :class:`Block`).

Ordering: every write and read takes the previous write's output *token* (a 0-d tensor) as an input,
so the autograd engine runs a writer's ``write`` backward only after the backward of every mix or
read that came later in the forward, i.e. after every reader of that writer has accumulated its
gradient. The writers ``d[a:b]`` that a mix read are never overwritten afterwards (writes only
append), so mixes need not save them.
"""

from __future__ import annotations

import torch
from torch.autograd.function import FunctionCtx


class DeltaBuffer:
    """Writer deltas ``d`` [W, B, T, D] and, once a backward starts, their gradients ``grad``."""

    def __init__(self, n_writers: int, batch: int, tokens: int, width: int, *, like: torch.Tensor):
        self.d = like.new_empty(n_writers, batch, tokens, width)  # [W, B, T, D]
        self._grad: torch.Tensor | None = None
        # a finished block's gradient [R_blk, B, T, D], reused by the block before it: writing a
        # fresh large tensor costs several times more than rewriting one (first-touch page faults)
        self.spare_block_grad: torch.Tensor | None = None

    @property
    def grad(self) -> torch.Tensor:
        """dL/dd [W, B, T, D], zero until mixes' backwards accumulate into it."""
        if self._grad is None:
            self._grad = torch.zeros_like(self.d)  # [W, B, T, D]
        return self._grad

    def zero_grad(self) -> None:
        if self._grad is None:
            self._grad = torch.zeros_like(self.d)  # [W, B, T, D]
        else:
            self._grad.zero_()


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
        # y [n, B, T, D]; ablated [n, B or 1, T, D] or None (zero ablation)
        out = buf.d[start : start + y.shape[0]]  # [n, B, T, D]
        if ablated is None:
            out.copy_(y)
        else:
            torch.sub(y, ablated, out=out)
        ctx.buf, ctx.start, ctx.n = buf, start, y.shape[0]  # type: ignore[attr-defined]
        return token.new_zeros(())

    @staticmethod
    def backward(ctx, g_token: torch.Tensor):  # type: ignore[override]
        g_y = ctx.buf.grad[ctx.start : ctx.start + ctx.n] if ctx.needs_input_grad[0] else None
        return g_y, g_token, None, None, None


class _Mix(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        m: torch.Tensor,
        token: torch.Tensor,
        buf: DeltaBuffer,
        base: torch.Tensor | None,
        index: torch.Tensor | None,
        last: bool,
    ) -> torch.Tensor:
        # m [R, W]; base broadcastable to one reader input; index [N] rows of the flat (B*T) axis
        n = m.shape[1]
        d = _rows(buf.d[:n], index)  # [n, B, T, D] or [n, N, D]
        x = (m @ d.reshape(n, -1)).view(m.shape[0], *d.shape[1:])  # [R, B, T, D] or [R, N, D]
        if base is not None:
            x += base
        ctx.save_for_backward(m)
        ctx.buf, ctx.index, ctx.last = buf, index, last  # type: ignore[attr-defined]
        return x

    @staticmethod
    def backward(ctx, g_x: torch.Tensor):  # type: ignore[override]
        (m,) = ctx.saved_tensors
        buf: DeltaBuffer = ctx.buf
        if (
            ctx.last
        ):  # the first backward to run: start from zero (a graph may be backpropagated twice)
            buf.zero_grad()
        n = m.shape[1]
        g_flat = g_x.reshape(m.shape[0], -1)  # [R, B*T*D] or [R, N*D]
        d = _rows(buf.d[:n], ctx.index).reshape(n, -1)  # [n, B*T*D] or [n, N*D]
        g_m = _grad_m(d, g_flat) if ctx.needs_input_grad[0] else None  # [R, n]
        if ctx.index is None:
            buf.grad[:n].view(n, -1).addmm_(m.T, g_flat)  # [n, B*T*D] += [n, R] @ [R, B*T*D]
        else:
            g_d = (m.T @ g_flat).view(n, ctx.index.shape[0], -1)  # [n, N, D]
            buf.grad[:n].flatten(1, 2).index_add_(1, ctx.index, g_d)  # [n, B*T, D]
        return g_m, _zero(m), None, None, None, None


class Block:
    """Inputs ``x`` [R_blk, B, T, D] of the readers of one block of layers, and their gradients.

    At the block's start one matmul fills ``x`` with each reader's ablated residual plus its mix over
    the writers before the block (``prefix``); each reader group then adds the writers inside the
    block in place (``read``). So the buffer's prefix is read once per block, not once per layer.
    """

    def __init__(self, rows: int, buf: DeltaBuffer) -> None:
        _, B, T, D = buf.d.shape
        self.x = buf.d.new_empty(rows, B, T, D)  # [R_blk, B, T, D]
        self._buf = buf
        self._grad: torch.Tensor | None = None  # [R_blk or more, B, T, D]

    @property
    def grad(self) -> torch.Tensor:
        """dL/dx [R_blk, B, T, D]; every row is written by its reader group's backward."""
        rows = self.x.shape[0]
        if self._grad is None:
            spare, self._buf.spare_block_grad = self._buf.spare_block_grad, None
            fits = spare is not None and spare.shape[0] >= rows
            self._grad = spare if fits else torch.empty_like(self.x)  # [R_blk or more, B, T, D]
        return self._grad[:rows]  # [R_blk, B, T, D]

    def free_grad(self) -> None:
        """Hand the gradient's memory on to the next block's backward (blocks run last to first)."""
        spare = self._buf.spare_block_grad
        if self._grad is not None and (spare is None or spare.shape[0] < self._grad.shape[0]):
            self._buf.spare_block_grad = self._grad
        self._grad = None


class _Prefix(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        m: torch.Tensor,
        token: torch.Tensor,
        buf: DeltaBuffer,
        block: Block,
        bases: tuple[tuple[int, int, torch.Tensor | None], ...],
    ) -> torch.Tensor:
        # m [R_blk, n] over writers :n; bases: (first row, row count, A_r [B|1, T, D] or None)
        n = m.shape[1]
        torch.mm(m, buf.d[:n].view(n, -1), out=block.x.view(m.shape[0], -1))  # [R_blk, B*T*D]
        for row, count, base in bases:
            if base is not None:
                block.x[row : row + count] += base
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
        d = buf.d[:n].view(n, -1)  # [n, B*T*D]
        g_m = _grad_m(d, g_x) if ctx.needs_input_grad[0] else None  # [R_blk, n]
        buf.grad[:n].view(n, -1).addmm_(m.T, g_x)  # [n, B*T*D] += [n, R_blk] @ [R_blk, B*T*D]
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
        split: tuple[int, ...],
    ) -> tuple[torch.Tensor, ...]:
        # m [R, n] over writers start..start+n (inside the block); rows row..row+R of the block
        R, n = m.shape
        x = block.x[row : row + R]  # [R, B, T, D]
        if n:
            x.view(R, -1).addmm_(m, buf.d[start : start + n].view(n, -1))  # [R, B*T*D]
        ctx.save_for_backward(m)
        ctx.buf, ctx.block, ctx.row, ctx.start = buf, block, row, start  # type: ignore[attr-defined]
        # Aliases, not views: later reads write other rows of block.x in place, which would bump
        # a view's version counter and invalidate tensors saved from it for the backward.
        return tuple(_alias(part) for part in x.split(split))

    @staticmethod
    def backward(ctx, *g_parts: torch.Tensor):  # type: ignore[override]
        (m,) = ctx.saved_tensors
        buf: DeltaBuffer = ctx.buf
        R, n = m.shape
        g_x = ctx.block.grad[ctx.row : ctx.row + R]  # [R, B, T, D]
        torch.cat(g_parts, out=g_x)  # [R, B, T, D]
        g_m = None
        if n:
            g_flat, d = g_x.view(R, -1), buf.d[ctx.start : ctx.start + n].view(n, -1)
            g_m = _grad_m(d, g_flat) if ctx.needs_input_grad[0] else None  # [R, n]
            buf.grad[ctx.start : ctx.start + n].view(n, -1).addmm_(m.T, g_flat)
        return g_m, _zero(m), _zero(m), None, None, None, None, None


def _rows(d: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """d [n, B, T, D] -> itself, or its rows ``index`` of the flat (B*T) axis [n, N, D]."""
    return d if index is None else d.flatten(1, 2)[:, index]


def _grad_m(d: torch.Tensor, g_x: torch.Tensor) -> torch.Tensor:
    """dL/dM = g_x @ d^T: d [n, X], g_x [R, X] -> [R, n].

    Computed as (d @ g_x^T)^T, which reads d row-major: several times faster for long rows.
    """
    return (d @ g_x.T).T


def _zero(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=like.dtype, device=like.device)


def _alias(t: torch.Tensor) -> torch.Tensor:
    """A tensor on ``t``'s memory with its own version counter (not an autograd view of ``t``)."""
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


def write(
    buf: DeltaBuffer, token: torch.Tensor, start: int, y: torch.Tensor, ablated: torch.Tensor | None
) -> torch.Tensor:
    """Store ``y - ablated`` [n, B, T, D] at writers ``start .. start+n``; returns the next token."""
    return _Write.apply(y, token, buf, start, ablated)


def mix(
    buf: DeltaBuffer,
    token: torch.Tensor,
    m: torch.Tensor,
    base: torch.Tensor | None = None,
    index: torch.Tensor | None = None,
    *,
    last: bool = False,
) -> torch.Tensor:
    """Readers' inputs ``base + m @ d[:n]``: m [R, n] -> [R, B, T, D] ([R, N, D] at ``index``).

    ``last`` marks the final mix of a forward (the logits reader): its backward runs first and
    resets the gradient buffer.
    """
    return _Mix.apply(m, token, buf, base, index, last)


def prefix(
    buf: DeltaBuffer,
    token: torch.Tensor,
    m: torch.Tensor,
    bases: tuple[tuple[int, int, torch.Tensor | None], ...],
) -> tuple[Block, torch.Tensor]:
    """Start a block: ``x = base + m @ d[:n]`` for its readers (m [R_blk, n]); returns the block
    and its token, which every :func:`read` of the block must take."""
    block = Block(m.shape[0], buf)
    return block, _Prefix.apply(m, token, buf, block, bases)


def read(
    buf: DeltaBuffer,
    token: torch.Tensor,
    block: Block,
    block_token: torch.Tensor,
    m: torch.Tensor,
    *,
    row: int,
    start: int,
    split: tuple[int, ...],
) -> tuple[torch.Tensor, ...]:
    """Finish a reader group's inputs: block rows ``row..row+R`` plus ``m @ d[start:start+n]``
    (m [R, n], the writers inside the block so far); returned as parts [R_i, B, T, D] by ``split``."""
    return _Read.apply(m, token, block_token, buf, block, row, start, split)
