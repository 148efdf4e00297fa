"""The writer-delta buffer and the autograd functions that fill and read it.

The masked forward keeps every writer's delta ``d_w = y_w - y~_w`` in one preallocated buffer
[W, B, T, D] filled in place, and mixes readers with matmuls over their upstream slices. Plain
autograd cannot follow in-place writes into one buffer, so:

* ``write`` copies a block of writer outputs into the buffer (``write_heads`` computes attention
  heads' outputs straight into it); its backward hands those writers the gradient accumulated for
  them in the gradient buffer.
* ``mix`` computes readers' inputs ``base + M @ d[:n]``; its backward returns dL/dM and accumulates
  ``M^T @ dL/dx`` into the gradient buffer.
* ``prefix`` and ``read`` do the same in two steps for a block of layers (see :class:`Block`).

Ordering: every write and read takes the previous write's output *token* (a 0-d tensor) as an input,
so the autograd engine runs a writer's ``write`` backward only after the backward of every mix or
read that came later in the forward, i.e. after every reader of that writer has accumulated its
gradient. The writers ``d[a:b]`` that a mix read are never overwritten afterwards (writes only
append), so mixes need not save them.

The backward reads the buffer's deltas only to form dL/dM = g_x @ d^T, so a buffer given other
``grad_deltas`` (EAP-IG's clean-minus-corrupted outputs, say) yields the gradient of the masks
against those instead, at no cost, while every other gradient stays that of the forward that ran.

The big tensors of a forward (the buffer, its gradient, every block's reader inputs) come from a
:class:`Workspace` that outlives the forward, so repeated steps reuse memory instead of mapping
fresh pages.
"""

from __future__ import annotations

import functools
import math
import threading
import weakref
from collections.abc import Callable

import torch
from torch.autograd.function import FunctionCtx


class Workspace:
    """Large scratch tensors kept between forwards of one model, lent out and given back.

    A fresh multi-megabyte CPU allocation is mapped page by page on first touch, which costs about
    as much as writing it twice; the masked forward needs several of them per step (the delta
    buffer, its gradient, every block's reader inputs), so they are kept here and reused. A tensor
    is lent to an *owner* object and comes back when the owner is garbage collected (for the
    buffers of a forward: when its autograd graph is freed), so nothing still in use is handed out
    twice. At most ``max_free`` idle tensors are kept (the smallest are dropped first).
    """

    def __init__(self, max_free: int = 32) -> None:
        self.max_free = max_free
        self.allocations = 0  # tensors allocated fresh (not reused) so far
        self._free: list[torch.Tensor] = []  # flat, idle
        self._lock = threading.Lock()

    def lend(self, owner: object, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` (``like``'s dtype and device), back when ``owner``
        is collected. Its first dimension is strided by :func:`row_stride` (the rest is
        contiguous), so ``t[a:b].view(b - a, -1)`` is a matrix of padded rows."""
        rows, row = shape[0], math.prod(shape[1:])
        stride = row_stride(row, like.element_size())
        n = (rows - 1) * stride + row if rows else 0
        with self._lock:
            fits = [
                i
                for i, t in enumerate(self._free)
                if t.numel() >= n and t.dtype == like.dtype and t.device == like.device
            ]
            best = min(fits, key=lambda i: self._free[i].numel(), default=None)
            if best is not None:
                flat = self._free.pop(best)
            else:  # the shapes grew (a longer batch): idle tensors too small for this are dropped
                self._free = [
                    t for t in self._free
                    if t.numel() >= n or t.dtype != like.dtype or t.device != like.device
                ]
                flat = like.new_empty(n)
                self.allocations += 1
        weakref.finalize(owner, self._give, flat)
        return flat.as_strided((rows, row), (stride, 1)).view(shape)

    def _give(self, flat: torch.Tensor) -> None:
        with self._lock:
            self._free.append(flat)
            if len(self._free) > self.max_free:
                self._free.remove(min(self._free, key=torch.Tensor.numel))

    @property
    def idle(self) -> int:
        """Tensors kept and not lent out."""
        with self._lock:
            return len(self._free)

    def clear(self) -> None:
        """Drop every idle tensor (lent ones come back as usual)."""
        with self._lock:
            self._free.clear()


def row_stride(row: int, element_size: int) -> int:
    """Elements between the rows of a lent matrix of rows of ``row`` elements: ``row`` rounded up
    to an odd number of 64-byte cache lines.

    The mixing matmuls walk down columns of [writers, B*T*D] matrices. With rows a multiple of
    4 KiB apart (B*T*D = 221,184 floats for SmolLM2 at 16 x 24 tokens is 216 pages) every row
    lands on the same cache sets and MKL's panels evict each other: 30-40 % slower on an AMD EPYC.
    """
    per_line = max(1, 64 // element_size)
    lines = -(-row // per_line)
    return (lines + 1 - lines % 2) * per_line


def _scratch(workspace: Workspace | None, owner: object, shape: tuple[int, ...],
             like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor, from ``workspace`` when there is one."""
    return like.new_empty(shape) if workspace is None else workspace.lend(owner, shape, like)


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


class _Loan:
    """An owner for a tensor lent for less than its user's lifetime (dropping it gives it back)."""


class DeltaBuffer:
    """Writer deltas ``d`` [W, B, T, D] and, once a backward starts, their gradients ``grad``.

    The gradient buffer is never zeroed as a whole: backward functions run from the last writer to
    the first, and rows ``ready..W`` are the ones already holding gradient. The first contribution
    to a row overwrites it (a matmul with beta 0) instead of adding to zeros. The gradient from
    readers read at the answer rows only (``index``) is summed in ``grad_at_index`` [W, N, D] and
    added when its writer's gradient is read (:meth:`writer_grad`).

    Writers from ``index_only`` on are read by nobody but readers at the answer rows (the last
    layer's, when only the logits there are wanted): they are kept in ``d_at_index`` alone,
    written there directly, and their gradient is their rows of ``grad_at_index``.
    """

    def __init__(self, n_writers: int, batch: int, tokens: int, width: int, *,
                 like: torch.Tensor, workspace: Workspace | None = None,
                 index: torch.Tensor | None = None, grad_deltas: torch.Tensor | None = None) -> None:
        self.shape = (n_writers, batch, tokens, width)
        self.workspace = workspace
        self.d = _scratch(workspace, self, self.shape, like)  # [W, B, T, D]
        # d at rows ``index`` of the flat (B*T) axis [W, N, D], copied as writers write (while
        # the rows are in cache), for the readers that read only there
        self.index = index
        self.d_at_index = None  # [W, N, D]
        if index is not None:
            self.d_at_index = _scratch(workspace, self, (n_writers, len(index), width), like)
            # the example and the token of every answer row, [N] each
            self.answer_rows = (torch.div(index, tokens, rounding_mode="floor"), index % tokens)
        # the deltas dL/dM is taken against in place of d (see :meth:`against`), [W, B, T, D],
        # and at the answer rows [W, N, D]; None: d itself
        self.grad_deltas = grad_deltas
        self.grad_deltas_at_index = None
        if grad_deltas is not None and index is not None:
            self.grad_deltas_at_index = grad_deltas.flatten(1, 2)[:, index]  # [W, N, D]
        self.index_only = n_writers  # writers from here on exist only in d_at_index
        # sum of the written writers' ablation values y~ [B|1, T, D] (None: zero ablation), from
        # which readers' ablated residuals A_r are formed; replaced, never updated in place
        self.ablated_sum: torch.Tensor | None = None
        self._grad: torch.Tensor | None = None  # [W, B, T, D]; rows ready.. hold gradient
        self.ready = n_writers
        self._grad_at_index: torch.Tensor | None = None  # [W, N, D]; rows ..held hold gradient
        self.held = 0

    @property
    def grad(self) -> torch.Tensor:
        """dL/dd [W, B, T, D] (only rows ``ready..W`` are meaningful)."""
        if self._grad is None:
            self._grad = _scratch(self.workspace, self, self.shape, self.d)
        return self._grad

    def start_backward(self) -> None:
        """Forget any gradient (the first backward function of a pass calls this)."""
        self.ready, self.held = self.index_only, 0

    def at_index(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """``t`` [..., B|1, T, D] at the answer rows: [..., N, D] (None stays None)."""
        if t is None:
            return None
        b, tok = self.answer_rows
        return t[..., b if t.shape[-3] > 1 else torch.zeros_like(b), tok, :]  # [..., N, D]

    def destination(self, start: int, stop: int, ablated: torch.Tensor | None) -> tuple[
        torch.Tensor, torch.Tensor | None
    ]:
        """Where writers ``start..stop`` write, and their ablation values ``ablated``
        [n, B|1, T, D] or None as the write subtracts them: rows of ``d`` [n, B, T, D], or for
        writers kept only at the answer rows rows of ``d_at_index`` [n, 1, N, D] and the ablation
        values there [n, 1, N, D]."""
        if start < self.index_only:
            assert stop <= self.index_only, "a write straddles the index-only writers"
            return self.d[start:stop], ablated
        ablated = self.at_index(ablated)
        return self.d_at_index[start:stop, None], None if ablated is None else ablated[:, None]

    def wrote(self, start: int, stop: int, ablated: torch.Tensor | None) -> None:
        """Writers ``start..stop`` were just written (ablation values ``ablated``
        [n, B|1, T, D] or None): keep their rows at ``index`` and add up their y~."""
        if ablated is not None:
            total = ablated.sum(0)  # [B|1, T, D]
            self.ablated_sum = total if self.ablated_sum is None else self.ablated_sum + total
        if self.index is not None and start < self.index_only:
            rows = self.d[start:stop].flatten(1, 2)  # [n, B*T, D], rows strided
            # (not index_select, which copies a strided input whole first)
            self.d_at_index[start:stop] = rows[:, self.index]  # [n, N, D]

    def rows(self, n: int, at_index: bool) -> torch.Tensor:
        """d of writers ..n [n, B, T, D], or at the answer rows [n, N, D]."""
        if at_index:
            return self.d_at_index[:n]
        assert n <= self.index_only, "writers kept only at the answer rows read in full"
        return self.d[:n]

    def against(self, start: int, stop: int, at_index: bool = False) -> torch.Tensor:
        """The deltas of writers ``start..stop`` that the mixing weights' gradient is taken
        against, dL/dM[r, w] = sum g_r * delta_w, as a matrix: [n, B*T*D], or at the answer rows
        [n, N*D]. They are the forward's own deltas ``d``, unless the buffer was given
        ``grad_deltas``: the backward reads ``d`` for nothing else, so swapping them changes the
        masks' gradient and nothing upstream of it (the gradient reaching writers and the model
        stays that of the forward that ran)."""
        n = stop - start
        if self.grad_deltas is None:
            rows = self.d_at_index[start:stop] if at_index else self.d[start:stop]
        else:
            rows = self.grad_deltas_at_index[start:stop] if at_index else self.grad_deltas[start:stop]
        if not at_index:
            assert stop <= self.index_only, "writers kept only at the answer rows read in full"
        return rows.reshape(n, -1)

    def _init_rows(self, start: int) -> None:
        """Make rows ``start..W`` hold gradient (zero the ones that have none yet)."""
        if start < self.ready:
            self.grad[start : self.ready].zero_()
            self.ready = start

    def accumulate(self, start: int, m_t: torch.Tensor, g: torch.Tensor) -> None:
        """grad[start : start+n] += m_t @ g: m_t [n, R], g [R, B*T*D]."""
        n = m_t.shape[0]
        if n == 0:
            return
        stop = start + n
        self._init_rows(stop)  # rows after this range (keeps ready..W contiguous)
        fresh = max(0, min(stop, self.ready) - start)  # rows start..start+fresh hold nothing yet
        flat = self.grad[start:stop].view(n, -1)  # [n, B*T*D]
        if fresh:
            _mm_wide(m_t[:fresh], g, flat[:fresh])
        if fresh < n:
            _mm_wide(m_t[fresh:], g, flat[fresh:], add=True)
        self.ready = min(self.ready, start)

    @property
    def grad_at_index(self) -> torch.Tensor:
        """dL/dd at the answer rows only [W, N, D] (rows ``..held`` are meaningful)."""
        if self._grad_at_index is None:
            self._grad_at_index = _scratch(self.workspace, self, self.d_at_index.shape, self.d)
        return self._grad_at_index

    def accumulate_at_index(self, m_t: torch.Tensor, g: torch.Tensor) -> None:
        """grad_at_index[:n] += m_t @ g: m_t [n, R], g [R, N*D] (readers at the answer rows)."""
        n = m_t.shape[0]
        flat = self.grad_at_index[:n].view(n, -1)  # [n, N*D]
        k = min(n, self.held)  # rows holding gradient already
        if k:
            flat[:k].addmm_(m_t[:k], g)
        if k < n:
            torch.mm(m_t[k:], g, out=flat[k:])
        self.held = max(self.held, n)

    def _fold(self, start: int, stop: int) -> None:
        """Add the answer rows' gradient of writers start..stop into their full gradient."""
        stop = min(stop, self.held, self.index_only)
        if start < stop:
            rows = self.grad[start:stop].flatten(1, 2)  # [n, B*T, D]
            rows.index_add_(1, self.index, self.grad_at_index[start:stop])

    def writer_grad(self, start: int, stop: int) -> torch.Tensor:
        """The complete gradient of writers ``start..stop`` [n, B, T, D] (every reader of theirs
        has run its backward); [n, 1, N, D] for writers kept only at the answer rows."""
        if start >= self.index_only:
            if stop > self.held:  # rows no reader added to
                self.grad_at_index[max(start, self.held) : stop].zero_()
                self.held = stop
            return self.grad_at_index[start:stop, None]  # [n, 1, N, D]
        self._init_rows(start)
        self._fold(start, stop)
        return self.grad[start:stop]


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
            H = weight.shape[0]
            g = ctx.buf.writer_grad(ctx.start, ctx.start + H)  # [H, B, T, D]
            _, B, T, D = g.shape
            # computed transposed, W_h @ g_h^T: MKL runs this shape markedly faster
            g_z = torch.bmm(weight, g.view(H, B * T, D).transpose(1, 2))  # [H, K, B*T]
            g_z = g_z.view(H, -1, B, T).permute(2, 0, 3, 1)  # [B, H, T, K]
        return g_z, None, None, g_token, None, None, None


def head_outputs(
    z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor
) -> None:
    """Every head's output ``z[:, h] @ weight[h] + bias / H`` into ``out`` (contiguous rows):
    z [B, H, T, K], weight [H, K, D], bias [D] or None, out [H, B, T, D]."""
    B, H, T, K = z.shape
    # z laid out [H, K, B*T] and read transposed (MKL's fastest form of this small-K product);
    # a bias comes in as one more row of z, of ones, against the bias share as one more row of W
    z_t = z.new_empty(H, K if bias is None else K + 1, B * T)  # [H, K(+1), B*T]
    z_t[:, :K].view(H, K, B, T).copy_(z.permute(1, 3, 0, 2))
    w = weight
    if bias is not None:
        z_t[:, K] = 1
        w = torch.cat([weight, (bias / H).expand(H, 1, -1)], 1)  # [H, K + 1, D]
    torch.bmm(z_t.transpose(1, 2), w, out=out.view(H, B * T, -1))  # [H, B*T, D]


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
        g_m = _grad_m(d, g_flat) if ctx.needs_input_grad[0] else None  # [R, n]
        if ctx.at_index:
            buf.accumulate_at_index(m.T, g_flat)  # [n, N*D] += [n, R] @ [R, N*D]
        else:
            buf.accumulate(0, m.T, g_flat)  # [n, B*T*D] += [n, R] @ [R, B*T*D]
        return g_m, _zero(m), None, None, None, None


class Block:
    """Inputs ``x`` [R_blk, B, T, D] of the readers of one block of layers, and their gradients.

    At the block's start one matmul fills ``x`` with each reader's ablated residual plus its mix over
    the writers before the block (``prefix``); each reader group then adds the writers inside the
    block in place (``read``). So the buffer's prefix is read once per block, not once per layer.

    ``x`` and its gradient take ``capacity`` rows from the workspace (at least ``rows``), so that
    blocks of a few sizes (a shorter last block) share one size of buffer between steps, and
    ``GRAD_M_ROWS - 1`` rows more, so that ``_grad_m`` always widens a run of gradient rows (the
    same computation whatever the workspace lent).
    """

    def __init__(self, rows: int, buf: DeltaBuffer, capacity: int = 0) -> None:
        _, B, T, D = buf.shape
        self._capacity = max(rows, capacity) + GRAD_M_ROWS - 1
        self.x = _scratch(buf.workspace, self, (self._capacity, B, T, D), buf.d)[:rows]
        # x [R_blk, B, T, D]
        self._buf = buf
        self._grad: torch.Tensor | None = None  # [R_blk, B, T, D]
        self._loan: _Loan | None = None

    @property
    def grad(self) -> torch.Tensor:
        """dL/dx [R_blk, B, T, D]; every row is written by its reader group's backward."""
        if self._grad is None:
            self._loan = _Loan()
            shape = (self._capacity, *self.x.shape[1:])
            grad = _scratch(self._buf.workspace, self._loan, shape, self.x)
            grad[len(self.x) :].zero_()  # read (and dropped) by _grad_m: no stale denormals
            self._grad = grad[: len(self.x)]
        return self._grad

    def free_grad(self) -> None:
        """Give the gradient's memory back (the next block's backward reuses it)."""
        self._grad = self._loan = None


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
        _mm_wide(m_in, buf.d[:k].view(k, -1), block.x.view(m.shape[0], -1))  # [R_blk, B*T*D]
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
        g_m = _grad_m(d, g_x) if ctx.needs_input_grad[0] else None  # [R_blk, n]
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
            _mm_wide(m_in, buf.d[start : start + k].view(k, -1), x.view(R, -1), add=True)
        ctx.save_for_backward(m)
        ctx.buf, ctx.block, ctx.row, ctx.start = buf, block, row, start  # type: ignore[attr-defined]
        # Aliases, not views: later reads write other rows of block.x in place, which would bump
        # a view's version counter and invalidate tensors saved from it for the backward. One per
        # group, each with its own gradient destination: slices of one output would have autograd
        # assemble their gradients in a zeroed full-size tensor.
        outs, offset = [], 0
        for size in returned:
            out = _alias(x[offset : offset + size])  # [size, B, T, D]
            out._edgeprune_grad_into = functools.partial(_rows_of, block, row + offset, size)
            outs.append(out)
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
            if not _same_memory(g, rows):  # see gradient_destination
                rows.copy_(g)  # kept for the block's prefix backward
            offset += g.shape[0]
        g_m = None
        if n:
            g_flat, d = g_x.view(R, -1), buf.against(ctx.start, ctx.start + n)  # [R|n, B*T*D]
            g_m = _grad_m(d, g_flat) if ctx.needs_input_grad[0] else None  # [R, n]
            buf.accumulate(ctx.start, m.T, g_flat)  # [n, B*T*D] += [n, R] @ [R, B*T*D]
        return g_m, _zero(m), _zero(m), None, None, None, None, None, None


def gradient_destination(x: torch.Tensor) -> Callable[[], torch.Tensor] | None:
    """Where the engine keeps the gradient of ``x``, when ``x`` is a reader input it handed out
    (see :func:`read`): a function returning a contiguous tensor of x's shape, valid during the
    backward pass. A backward function whose gradient for ``x`` it computes from scratch may write
    it there and return that tensor, which spares the engine copying it; None otherwise."""
    return getattr(x, "_edgeprune_grad_into", None)


def _rows_of(block: Block, row: int, count: int) -> torch.Tensor:
    return block.grad[row : row + count]  # [count, B, T, D]


WIDE_CHUNK = 2048  # columns per matmul call in _mm_wide


def _mm_wide(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, add: bool = False) -> None:
    """``out = a @ b`` (``out += a @ b`` with ``add``) for a wide ``b``: a [M, K], b [K, X],
    out [M, X].

    With a deep K the product is taken ``WIDE_CHUNK`` columns at a time. Measured alone on an AMD
    EPYC (1 and 2 threads), one MKL call over hundreds of thousands of columns was 5-40 % slower
    than chunks for the prefix shapes (K of 80-250), and faster for a shallow K; in a whole masked
    step the difference is within that machine's noise (about 1-3 %).
    """
    X = b.shape[1]
    step = WIDE_CHUNK if a.shape[1] >= 64 else max(X, 1)
    for s in range(0, X, step):
        o, part = out[:, s : s + step], b[:, s : s + step]
        if add:
            o.addmm_(a, part)
        else:
            torch.mm(a, part, out=o)


GRAD_M_ROWS = 8  # g_x in _grad_m is widened to a multiple of this many rows where it can be


def _grad_m(d: torch.Tensor, g_x: torch.Tensor) -> torch.Tensor:
    """dL/dM = g_x @ d^T: d [n, X], g_x [R, X] -> [R, n].

    Computed as (d @ g_x^T)^T, which reads d row-major: several times faster for long rows. MKL
    runs it markedly slower when R, the product's column count, is not a multiple of 8 (on an AMD
    EPYC, 2 threads: 56-88 against 112 GFLOP/s for 111 against 112 rows, 32 against 74 for 15
    against 16). Where g_x's memory runs on past its rows with the same stride (rows of a block's
    gradient, see :class:`Block`), more than 8 rows are widened to a multiple of 8: each product
    column depends on its own row alone, so the extra rows, whatever they hold, give extra columns
    that are dropped.
    """
    R = g_x.shape[0]
    if R <= GRAD_M_ROWS:  # few rows: widening costs more than it gains
        return (d @ g_x.T).T
    wide = _widened(g_x, -(-R // GRAD_M_ROWS) * GRAD_M_ROWS)  # [R', X]
    return (d @ wide.T)[:, :R].T


def _widened(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` [R, X] with rows ``rows`` >= R: the same memory read on to ``rows`` rows when its
    storage holds them (t's rows are contiguous), else ``t`` itself."""
    R, X = t.shape
    if rows == R or t.stride(1) != 1:
        return t
    end = t.storage_offset() + (rows - 1) * t.stride(0) + X  # elements the widened view spans
    if end > t.untyped_storage().nbytes() // t.element_size():
        return t
    return t.as_strided((rows, X), t.stride())  # [rows, X]


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` (of one shape) are the same elements of the same memory."""
    return a.data_ptr() == b.data_ptr() and all(
        n == 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride())
    )


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
