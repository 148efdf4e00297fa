"""A per-reader norm followed by per-head projections, fused so that the norm costs little.

Every q/k/v reader normalises its own input, so a layer normalises H + 2 KV full-width inputs
where the original model normalises one. Both norms scale each token by one number ``rstd``, so
the scale can be applied to the K-wide head output instead of the D-wide input:

* RMSNorm:   ``(x * rstd * w) @ W^T == rstd * ((x * w) @ W^T)``
* LayerNorm: ``((x - mu) * rstd * w + b) @ W^T == rstd * ((x * w) @ W^T - mu * (w @ W^T)) + b @ W^T``

The norm weight scales the (small) projection weight rather than the input, and the backward is
written by hand (weights are frozen): forward reads each input for its statistics (one reduction,
two for LayerNorm) and for the projection, and writes nothing full-width; backward writes the
projection's transpose and updates it in place once, instead of the handful of full-width
temporaries autograd keeps for a norm.
The gradient with respect to x is written where the masked forward keeps it when the caller says
where that is (``grad_into``), saving a full-width copy.
Shapes: R readers (one per head), B batch, T tokens, D width, K head width.
"""

from __future__ import annotations

import torch
from torch import nn

from edgeprune.engine.adapters.base import GradInto

# Norm classes known to compute weight * x * rsqrt(mean(x^2) + variance_epsilon)
STANDARD_RMS_NORMS = frozenset(
    {"LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm"}
)
# Norm classes known to compute (1 + weight) * x * rsqrt(mean(x^2) + eps): Gemma stores the scale's
# offset from 1 (and multiplies in float32 before rounding, which the fused product does too)
OFFSET_RMS_NORMS = frozenset({"GemmaRMSNorm", "Gemma2RMSNorm"})
RMS_NORMS = STANDARD_RMS_NORMS | OFFSET_RMS_NORMS


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # at least float32, as HF computes norms


def _empty_in_layout_of(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """An empty tensor of ``shape`` whose dimensions lie in memory in the order of ``t``'s (so an
    elementwise op from ``t`` into it runs in memory order, whatever view of a fused projection
    ``t`` is)."""
    order = sorted(range(t.dim()), key=lambda i: -t.stride(i))  # outermost first
    out = t.new_empty([shape[i] for i in order])
    return out.permute([order.index(i) for i in range(t.dim())])


class _NormProject(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        norm_weight: torch.Tensor,
        norm_bias: torch.Tensor | None,
        eps: float,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        centred: bool,
        grad_into: GradInto | None,
    ) -> torch.Tensor:
        # x [R, B, T, D]; norm_weight, norm_bias [D]; weight [R, K, D], bias [R, K] (frozen)
        # -> [B, R, T, K]; grad_into: where x's gradient may be written, or None
        D = x.shape[-1]
        R, K = weight.shape[:2]
        # (x * w) @ W^T == x @ (W * w)^T: scale the small weight, not the full-width input. For
        # LayerNorm one more row, of ones, through which the backward adds a per-row constant
        scaled = _empty_in_layout_of(weight, (R, K + 1 if centred else K, D))  # kept (small)
        torch.mul(weight, norm_weight, out=scaled[:, :K])  # [R, K, D]
        p = torch.einsum("rbtd,rkd->brtk", x, scaled[:, :K])  # [B, R, T, K]
        stats = _stats_dtype(x)
        sq = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=stats).square() / D  # E[x^2]
        c = mu = None
        if centred:  # LayerNorm: var = E[x^2] - mu^2, two reductions faster than the native
            # kernel's Welford pass; exact enough unless |mu| >> std
            scaled[:, K] = 1
            mean = x.sum(-1, keepdim=True, dtype=stats) / D  # [R, B, T, 1]
            var = (sq - mean.square()).clamp_min(0)
            mu, rstd = mean.to(x.dtype), torch.rsqrt(var + eps).to(x.dtype)  # [R, B, T, 1] each
            c = scaled[:, :K].sum(-1)  # w @ W^T per head [R, K]
            p = p - mu.transpose(0, 1) * c[None, :, None, :]  # [B, R, T, K]
        else:  # RMSNorm
            rstd = torch.rsqrt(sq + eps).to(x.dtype)  # [R, B, T, 1]
        if norm_bias is not None:  # the norm's bias through the projection: b_n @ W^T [R, K]
            shift = torch.einsum("d,rkd->rk", norm_bias, weight)
            bias = shift if bias is None else bias + shift
        if bias is None:
            out = p * rstd.transpose(0, 1)  # [B, R, T, K]
        else:
            out = torch.addcmul(bias[None, :, None, :], p, rstd.transpose(0, 1))  # [B, R, T, K]
        ctx.save_for_backward(x, rstd, p, scaled, mu, c)
        ctx.grad_into = grad_into
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        x, rstd, p, scaled, mu, c = ctx.saved_tensors
        R, B, T, D = x.shape  # g [B, R, T, K], in any memory layout
        rstd_b = rstd.transpose(0, 1)  # [B, R, T, 1]
        # through rstd: d rstd / dx = -rstd^3 (x - mu) / D   (mu = 0 for RMSNorm)
        coef = (g * p).sum(-1, keepdim=True).transpose(0, 1) * rstd.pow(3) / -D  # [R, B, T, 1]
        # g * rstd laid out [R, K, B*T] and read transposed (BLAS's fastest form of this small-K
        # product); for LayerNorm one more row: the per-row constant from mu (d mu / dx = 1 / D)
        # and from the -mu of (x - mu) in the rstd term, multiplied by scaled's row of ones
        K = p.shape[-1]
        a = g.new_empty(R, scaled.shape[1], B * T)  # [R, K(+1), B*T]
        torch.mul(g, rstd_b, out=a[:, :K].view(R, K, B, T).permute(2, 0, 3, 1))
        if mu is not None:
            g_mu = -(a[:, :K] * c[:, :, None]).sum(1, keepdim=True)  # [R, 1, B*T]
            shift = g_mu / D - (coef * mu).reshape(R, 1, B * T)  # [R, 1, B*T]
            a[:, K:] = shift
        # straight into the engine's gradient buffer when it says where x's gradient goes
        g_x = ctx.grad_into() if ctx.grad_into is not None else torch.empty_like(x)  # [R, B, T, D]
        torch.bmm(a.transpose(1, 2), scaled, out=g_x.view(R, B * T, D))  # [R, B*T, D]
        g_x.addcmul_(x, coef)  # [R, B, T, D]
        return g_x, None, None, None, None, None, None, None


def rms_norm_project(
    x: torch.Tensor, norm: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None,
    grad_into: GradInto | None = None,
) -> torch.Tensor:
    """``norm(x[r]) @ weight[r]^T + bias[r]`` for every reader r: x [R, B, T, D], weight [R, K, D],
    bias [R, K] or None -> [B, R, T, K].

    ``norm`` is one of RMS_NORMS (its ``weight`` and ``variance_epsilon``, or for
    OFFSET_RMS_NORMS ``1 + weight`` in at least float32 and ``eps``, are used).
    ``grad_into``: where x's gradient may be written during the backward pass (see
    ``Adapter.queries``).
    """
    if type(norm).__name__ in OFFSET_RMS_NORMS:
        scale, eps = 1 + norm.weight.to(_stats_dtype(norm.weight)), norm.eps  # [D]
    else:
        scale, eps = norm.weight, norm.variance_epsilon  # [D]
    return _NormProject.apply(x, scale, None, eps, weight, bias, False, grad_into)


def layer_norm_project(
    x: torch.Tensor, norm: nn.LayerNorm, weight: torch.Tensor, bias: torch.Tensor | None = None,
    grad_into: GradInto | None = None,
) -> torch.Tensor:
    """``norm(x[r]) @ weight[r]^T + bias[r]`` for every reader r with a LayerNorm over the last
    dimension: x [R, B, T, D], weight [R, K, D], bias [R, K] or None -> [B, R, T, K]
    (``grad_into``: as in :func:`rms_norm_project`)."""
    return _NormProject.apply(x, norm.weight, norm.bias, norm.eps, weight, bias, True, grad_into)


def plain_layer_norm_project(
    x: torch.Tensor, eps: float, weight: torch.Tensor, bias: torch.Tensor | None = None,
    grad_into: GradInto | None = None,
) -> torch.Tensor:
    """:func:`layer_norm_project` for a LayerNorm without weight or bias (OLMo's), whose
    epsilon is ``eps``: x [R, B, T, D], weight [R, K, D], bias [R, K] or None -> [B, R, T, K]."""
    ones = weight.new_ones(x.shape[-1])  # [D]
    return _NormProject.apply(x, ones, None, eps, weight, bias, True, grad_into)


def rms_norm_shares(y: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Each writer's share of an RMSNorm of their sum: y [H, ..., D], scale [D] ->
    ``y[h] * scale / rms(sum_h y[h])`` [H, ..., D]. One factor for all, so the shares sum to the
    norm of the sum; its statistics in at least float32 and each share rounded once to y's
    dtype, as the norm computes and rounds its output."""
    stats = _stats_dtype(y)
    total = y.sum(0, dtype=stats)  # [..., D]
    rstd = torch.rsqrt(total.square().mean(-1, keepdim=True) + eps)  # [..., 1]
    return (y * (rstd * scale.to(stats))).to(y.dtype)  # [H, ..., D]
