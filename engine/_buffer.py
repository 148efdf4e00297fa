"""Where the masked forward keeps its tensors: the writer-delta buffer and a block's reader inputs.

Every writer's delta ``d_w = y_w - y~_w`` (its output minus its ablation value) lives in one
buffer ``d`` [W, B, T, D], written in place as the forward goes, so that a reader's input
``x_r = A_r + sum_{w < n_r} M[r, w] * d_w`` is one matmul over a prefix of its rows. This module
holds that layout (and the gradients' layout); the autograd functions that fill and read it are in
_autograd.py. Shapes: W writers, B batch, T tokens, D width, N answer rows, R readers.
"""

from __future__ import annotations

import torch

from edgeprune.engine._kernels import GRAD_M_ROWS, matmul_into
from edgeprune.engine.workspace import Loan, Workspace, scratch


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
        self.d = scratch(workspace, self, self.shape, like)  # [W, B, T, D]
        # d at rows ``index`` of the flat (B*T) axis [W, N, D], copied as writers write (while
        # the rows are in cache), for the readers that read only there
        self.index = index
        self.d_at_index = None  # [W, N, D]
        if index is not None:
            self.d_at_index = scratch(workspace, self, (n_writers, len(index), width), like)
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
            self._grad = scratch(self.workspace, self, self.shape, self.d)
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
            matmul_into(m_t[:fresh], g, flat[:fresh])
        if fresh < n:
            matmul_into(m_t[fresh:], g, flat[fresh:], add=True)
        self.ready = min(self.ready, start)

    @property
    def grad_at_index(self) -> torch.Tensor:
        """dL/dd at the answer rows only [W, N, D] (rows ``..held`` are meaningful)."""
        if self._grad_at_index is None:
            self._grad_at_index = scratch(self.workspace, self, self.d_at_index.shape, self.d)
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


class Block:
    """Inputs ``x`` [R_blk, B, T, D] of the readers of one block of layers, and their gradients.

    At the block's start one matmul fills ``x`` with each reader's ablated residual plus its mix over
    the writers before the block (``prefix``); each reader group then adds the writers inside the
    block in place (``read``). So the buffer's prefix is read once per block, not once per layer.

    ``x`` and its gradient take ``capacity`` rows from the workspace (at least ``rows``), so that
    blocks of a few sizes (a shorter last block) share one size of buffer between steps, and
    ``GRAD_M_ROWS - 1`` rows more, so that ``mask_gradient`` always widens a run of gradient rows (the
    same computation whatever the workspace lent).
    """

    def __init__(self, rows: int, buf: DeltaBuffer, capacity: int = 0) -> None:
        _, B, T, D = buf.shape
        self._capacity = max(rows, capacity) + GRAD_M_ROWS - 1
        self.x = scratch(buf.workspace, self, (self._capacity, B, T, D), buf.d)[:rows]
        # x [R_blk, B, T, D]
        self._buf = buf
        self._grad: torch.Tensor | None = None  # [R_blk, B, T, D]
        self._loan: Loan | None = None

    @property
    def grad(self) -> torch.Tensor:
        """dL/dx [R_blk, B, T, D]; every row is written by its reader group's backward."""
        if self._grad is None:
            self._loan = Loan()
            shape = (self._capacity, *self.x.shape[1:])
            grad = scratch(self._buf.workspace, self._loan, shape, self.x)
            grad[len(self.x) :].zero_()  # read (and dropped) by mask_gradient: no stale denormals
            self._grad = grad[: len(self.x)]
        return self._grad

    def free_grad(self) -> None:
        """Give the gradient's memory back (the next block's backward reuses it)."""
        self._grad = self._loan = None


class GradInto:
    """Where the engine keeps the gradient of reader inputs it handed out: rows ``row..row+count``
    of a block's gradient [count, B, T, D], valid during the backward pass.

    A backward function that computes the gradient of such an input from scratch may write it
    there (``grad_into()``) and return that tensor: the read's backward then finds it already in
    place and copies nothing.
    """

    def __init__(self, block: Block, row: int, count: int) -> None:
        self.block, self.row, self.count = block, row, count

    def __call__(self) -> torch.Tensor:
        return self.block.grad[self.row : self.row + self.count]  # [count, B, T, D]
