"""Memory kept between masked forwards: the big scratch tensors of one step, lent and given back.

The masked forward needs several tensors as large as the delta buffer (the buffer, its gradient,
every block's reader inputs). A fresh large CPU allocation is mapped page by page on first touch,
so they are kept here between steps and reused instead.
"""

from __future__ import annotations

import math
import threading
import weakref

import torch


class Workspace:
    """Large scratch tensors kept between forwards of one model, lent out and given back.

    A tensor is lent to an *owner* object and comes back when the owner is garbage collected (for
    the buffers of a forward: when its autograd graph is freed), so nothing still in use is handed
    out twice. At most ``max_free`` idle tensors are kept (the smallest are dropped first).
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

    The mixing matmuls walk down columns of [writers, B*T*D] matrices; rows a multiple of 4 KiB
    apart would all land on the same cache sets and evict each other.
    """
    per_line = max(1, 64 // element_size)
    lines = -(-row // per_line)
    return (lines + 1 - lines % 2) * per_line


class Loan:
    """An owner for a tensor lent for less than its user's lifetime (dropping it gives it back)."""


def scratch(workspace: Workspace | None, owner: object, shape: tuple[int, ...],
            like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of ``shape``, lent by ``workspace`` to ``owner`` when there is
    one."""
    return like.new_empty(shape) if workspace is None else workspace.lend(owner, shape, like)
