"""The dense products of the masked forward and its backward, in paper terms.

With writer deltas ``d_w = y_w - y~_w`` stacked as a matrix ``d`` [W, X] (X = B*T*D, one row per
writer) and mixing weights ``M`` [R, W] (M[r, w] = z_wr * z_w), the masked forward is matmuls:

* readers' inputs:     ``x = A + M @ d``                      (:func:`matmul_into`)
* writers' gradients:  ``dL/dd += M^T @ dL/dx``               (:func:`matmul_into`, ``add``)
* masks' gradients:    ``dL/dM = dL/dx @ d^T``                (:func:`mask_gradient`)
* heads' outputs:      ``y_h = z_h @ W_O[h] + b_O / H``       (:func:`head_outputs`)

Shapes: R readers, W (or n) writers, X the flattened B*T*D, B batch, T tokens, D width, H heads,
K head width.
"""

from __future__ import annotations

import torch


def matmul_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, add: bool = False) -> None:
    """``out = a @ b``, or ``out += a @ b`` with ``add``: a [M, K], b [K, X], out [M, X] (rows may
    be strided, as the workspace lends them)."""
    if add:
        out.addmm_(a, b)
    else:
        torch.mm(a, b, out=out)


GRAD_M_ROWS = 8  # dL/dx in mask_gradient is widened to a multiple of this many rows where it can be


def mask_gradient(d: torch.Tensor, g_x: torch.Tensor) -> torch.Tensor:
    """dL/dM[r, w] = sum over rows of dL/dx_r * d_w: d [n, X], g_x [R, X] -> [R, n].

    Computed as (d @ g_x^T)^T, which reads d row-major (much faster for long rows). BLAS runs this
    product markedly slower when R is not a multiple of 8, so where g_x's memory runs on past its
    rows with the same stride (rows of a block's gradient, see ``Block``), more than 8 rows are
    widened to a multiple of 8: each product column depends on its own row alone, so the extra
    rows, whatever they hold, give extra columns that are dropped.
    """
    R = g_x.shape[0]
    if R <= GRAD_M_ROWS:  # few rows: widening costs more than it gains
        return (d @ g_x.T).T
    wide = widened(g_x, -(-R // GRAD_M_ROWS) * GRAD_M_ROWS)  # [R', X]
    return (d @ wide.T)[:, :R].T


def widened(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` [R, X] with rows ``rows`` >= R: the same memory read on to ``rows`` rows when its
    storage holds them (t's rows are contiguous), else ``t`` itself."""
    R, X = t.shape
    if rows == R or t.stride(1) != 1:
        return t
    end = t.storage_offset() + (rows - 1) * t.stride(0) + X  # elements the widened view spans
    if end > t.untyped_storage().nbytes() // t.element_size():
        return t
    return t.as_strided((rows, X), t.stride())  # [rows, X]


def head_outputs(
    z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor
) -> None:
    """Every head's output ``z[:, h] @ weight[h] + bias / H`` into ``out`` (contiguous rows):
    z [B, H, T, K], weight [H, K, D], bias [D] or None, out [H, B, T, D].

    The output projection's bias is split evenly over the heads, so that their outputs still sum
    to the original layer's output.
    """
    B, H, T, K = z.shape
    # z laid out [H, K, B*T] and read transposed (BLAS's fastest form of this small-K product);
    # a bias comes in as one more row of z, of ones, against the bias share as one more row of W
    z_t = z.new_empty(H, K if bias is None else K + 1, B * T)  # [H, K(+1), B*T]
    z_t[:, :K].view(H, K, B, T).copy_(z.permute(1, 3, 0, 2))
    w = weight
    if bias is not None:
        z_t[:, K] = 1
        w = torch.cat([weight, (bias / H).expand(H, 1, -1)], 1)  # [H, K + 1, D]
    torch.bmm(z_t.transpose(1, 2), w, out=out.view(H, B * T, -1))  # [H, B*T, D]


def head_outputs_grad(weight: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """dL/dz from the heads' outputs' gradient: weight [H, K, D], g [H, B, T, D] -> [B, H, T, K].

    Computed transposed, W_h @ g_h^T, the faster form of this product."""
    H, B, T, D = g.shape
    g_z = torch.bmm(weight, g.view(H, B * T, D).transpose(1, 2))  # [H, K, B*T]
    return g_z.view(H, -1, B, T).permute(2, 0, 3, 1)  # [B, H, T, K]


def same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` (of one shape) are the same elements of the same memory."""
    return a.data_ptr() == b.data_ptr() and all(
        n == 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride())
    )


def alias(t: torch.Tensor) -> torch.Tensor:
    """A tensor on ``t``'s memory with its own version counter (not an autograd view of ``t``)."""
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())
