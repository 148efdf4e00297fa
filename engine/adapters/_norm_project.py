"""A per-reader norm followed by per-head projections, fused so that the norm costs little.

Every q/k/v reader normalises its own input, so a layer normalises H + 2 KV full-width inputs
where the original model normalises one. Both norms scale each token by one number ``rstd``, so
the scale can be applied to the K-wide head output instead of the D-wide input:

* RMSNorm:   ``(x * rstd * w) @ W^T == rstd * ((x * w) @ W^T)``
* LayerNorm: ``((x - mu) * rstd * w + b) @ W^T == rstd * ((x * w) @ W^T - mu * (w @ W^T)) + b @ W^T``

The norm weight scales the (small) projection weight rather than the input, and the backward is
written by hand (weights are frozen): forward reads each input twice (statistics, projection) and
writes nothing full-width; backward writes the projection's transpose and updates it in place once
(twice for LayerNorm), instead of the handful of full-width temporaries autograd keeps for a norm.
Shapes: R readers (one per head), B batch, T tokens, D width, K head width.
"""

from __future__ import annotations

import torch
from torch import nn

# Norm classes known to compute weight * x * rsqrt(mean(x^2) + variance_epsilon)
STANDARD_RMS_NORMS = frozenset({"LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm"})


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # at least float32, as HF computes norms


class _NormProject(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        norm_weight: torch.Tensor,
        norm_bias: torch.Tensor | None,
        eps: float,
        weight: torch.Tensor,
        centred: bool,
    ) -> torch.Tensor:
        # x [R, B, T, D]; norm_weight, norm_bias [D]; weight [R, K, D] (frozen) -> [B, R, T, K]
        D = x.shape[-1]
        if centred:  # LayerNorm: the statistics exactly as the native kernel computes them
            # (var_mean is several times slower on CPU); its normalised output is discarded
            _, mu, rstd = torch.native_layer_norm(x, (D,), None, None, eps)
            mu, rstd = mu.to(x.dtype), rstd.to(x.dtype)  # [R, B, T, 1] each
        else:  # RMSNorm
            norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=_stats_dtype(x))
            rstd, mu = torch.rsqrt(norm.square() / D + eps).to(x.dtype), None  # [R, B, T, 1]
        # (x * w) @ W^T == x @ (W * w)^T: scale the small weight, not the full-width input
        scaled = weight * norm_weight  # [R, K, D], kept for the backward (small)
        p = torch.einsum("rbtd,rkd->brtk", x, scaled)  # [B, R, T, K]
        c = None
        if centred:
            c = scaled.sum(-1)  # w @ W^T per head [R, K]
            p = p - mu.transpose(0, 1) * c[None, :, None, :]  # [B, R, T, K]
        out = p * rstd.transpose(0, 1)  # [B, R, T, K]
        if norm_bias is not None:
            out = out + torch.einsum("d,rkd->rk", norm_bias, weight)[None, :, None, :]
        ctx.save_for_backward(x, rstd, p, scaled, mu, c)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        x, rstd, p, scaled, mu, c = ctx.saved_tensors
        D = x.shape[-1]
        rstd_b = rstd.transpose(0, 1)  # [B, R, T, 1]
        g_x = torch.einsum("brtk,rkd->rbtd", g * rstd_b, scaled)  # [R, B, T, D]
        # through rstd: d rstd / dx = -rstd^3 (x - mu) / D   (mu = 0 for RMSNorm)
        coef = (g * p).sum(-1, keepdim=True).transpose(0, 1) * rstd.pow(3) / -D  # [R, B, T, 1]
        g_x.addcmul_(x, coef)  # [R, B, T, D]
        if mu is not None:
            # through mu: d mu / dx = 1 / D, and the -mu part of (x - mu) in the rstd term
            g_mu = -(g * rstd_b * c[None, :, None, :]).sum(-1, keepdim=True).transpose(0, 1)
            g_x.add_(g_mu / D - coef * mu)  # [R, B, T, D]
        return g_x, None, None, None, None, None


def rms_norm_project(x: torch.Tensor, norm: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``norm(x[r]) @ weight[r]^T`` for every reader r: x [R, B, T, D], weight [R, K, D] -> [B, R, T, K].

    ``norm`` is one of STANDARD_RMS_NORMS (its ``weight`` and ``variance_epsilon`` are used).
    """
    return _NormProject.apply(x, norm.weight, None, norm.variance_epsilon, weight, False)


def layer_norm_project(x: torch.Tensor, norm: nn.LayerNorm, weight: torch.Tensor) -> torch.Tensor:
    """``norm(x[r]) @ weight[r]^T`` for every reader r with a LayerNorm over the last dimension:
    x [R, B, T, D], weight [R, K, D] -> [B, R, T, K]."""
    return _NormProject.apply(x, norm.weight, norm.bias, norm.eps, weight, True)
