"""Validation of CircuitModel inputs and resolution of masks into dense tensors.

Every problem raises :class:`InvalidArgument` naming the argument at fault, never a bare traceback.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from edgeprune.engine.errors import InvalidArgument

Mask = Mapping[str, float | torch.Tensor] | torch.Tensor | None
ABLATIONS = ("corrupted", "zero", "mean")


def check_ids(
    ids: object, field: str, *, vocab: int, max_len: int | None, device: torch.device
) -> torch.Tensor:
    """A token-id batch [B, T] of integers in [0, vocab), on ``device``."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.numel() == 0:
        raise InvalidArgument(f"{field} must be a non-empty integer tensor [B, T]", field=field)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise InvalidArgument(f"{field} must hold integer token ids, not {ids.dtype}", field=field)
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise InvalidArgument(f"{field} holds token ids outside [0, {vocab})", field=field)
    if max_len is not None and ids.shape[1] > max_len:
        raise InvalidArgument(
            f"{field} has {ids.shape[1]} tokens; the model takes at most {max_len}", field=field
        )
    return ids.to(device=device, dtype=torch.long)


def check_attention_mask(mask: object, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """A right-padded 0/1 mask of ``shape`` [B, T] (all ones when None), as bool on ``device``."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if not isinstance(mask, torch.Tensor) or mask.shape != shape:
        raise InvalidArgument(
            f"attention_mask must have the shape of input_ids {tuple(shape)}",
            field="attention_mask",
        )
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise InvalidArgument("attention_mask must hold only 0 and 1", field="attention_mask")
    mask = mask.to(device=device, dtype=torch.bool)
    if not bool(mask[:, 0].all()) or bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise InvalidArgument(
            "attention_mask must be right-padded (1s then 0s, at least one 1 per row)",
            field="attention_mask",
        )
    return mask


def check_positions(positions: object, batch: int, tokens: int) -> torch.Tensor | None:
    """Answer positions [B] or [B, P] in [0, T) (or None) -> rows of the flat (B*T) axis [B*P]."""
    if positions is None:
        return None
    if (
        not isinstance(positions, torch.Tensor)
        or positions.dim() not in (1, 2)
        or positions.shape[0] != batch
        or positions.dtype.is_floating_point
        or positions.dtype == torch.bool
    ):
        raise InvalidArgument(
            f"positions must be an integer tensor [B] or [B, P] with B = {batch}", field="positions"
        )
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= tokens):
        raise InvalidArgument(f"positions must lie in [0, {tokens})", field="positions")
    rows = torch.arange(batch, device=positions.device).view(batch, *([1] * (positions.dim() - 1)))
    return (rows * tokens + positions).reshape(-1).long()  # [B*P]


def check_ablation(ablation: object) -> str:
    if ablation not in ABLATIONS:
        raise InvalidArgument(
            f"ablation must be one of {', '.join(ABLATIONS)}, not {ablation!r}", field="ablation"
        )
    return str(ablation)


def check_ablated(
    ablated: object, *, writers: int, batch: int, tokens: int, width: int, like: torch.Tensor
) -> torch.Tensor:
    """Precomputed ablation values [W, B or 1, T, D], cast to ``like``'s dtype and device."""
    ok = isinstance(ablated, torch.Tensor) and ablated.dim() == 4
    if ok:
        w, b, t, d = ablated.shape  # type: ignore[union-attr]
        ok = w == writers and b in (1, batch) and t == tokens and d == width
    if not ok:
        raise InvalidArgument(
            f"ablated must have shape [{writers}, {batch} or 1, {tokens}, {width}]", field="ablated"
        )
    return ablated.detach().to(device=like.device, dtype=like.dtype)  # type: ignore[union-attr]


def check_activations(value: object, shape: tuple[int, ...], *, like: torch.Tensor,
                      field: str) -> torch.Tensor:
    """Per-writer activations of exactly ``shape`` ([writers, B, T, D]), cast to ``like``'s
    dtype and device (gradients flow through the cast)."""
    if not isinstance(value, torch.Tensor) or value.shape != shape or not value.is_floating_point():
        raise InvalidArgument(f"{field} must be a float tensor {list(shape)}", field=field)
    return value.to(device=like.device, dtype=like.dtype)


def check_out(out: object, shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device,
              field: str) -> torch.Tensor:
    """A caller's tensor to write into: contiguous, of ``shape``, ``dtype`` and ``device``."""
    if (
        not isinstance(out, torch.Tensor)
        or out.shape != shape
        or out.dtype != dtype
        or out.device != device
        or not out.is_contiguous()
    ):
        raise InvalidArgument(
            f"{field} must be a contiguous {dtype} tensor {list(shape)} on {device}", field=field
        )
    return out


def dense_mask(
    mask: Mask, size: int, index: Callable[[str], int], field: str, like: torch.Tensor
) -> torch.Tensor | None:
    """A mask as a dense tensor [size] in graph order (None stays None: every entry 1).

    ``mask`` is a dense tensor [size] or a dict {name: value} (names absent mean 1); ``index`` maps
    a name to its position (raising InvalidArgument for unknown names). Gradients flow through.
    """
    if mask is None:
        return None
    if isinstance(mask, torch.Tensor):
        if mask.shape != (size,) or not mask.dtype.is_floating_point:
            raise InvalidArgument(f"{field} must be a float tensor [{size}]", field=field)
        return mask.to(device=like.device, dtype=like.dtype)
    if not isinstance(mask, Mapping):
        raise InvalidArgument(
            f"{field} must be a tensor [{size}] or a dict name -> value", field=field
        )
    dense = torch.ones(size, device=like.device, dtype=like.dtype)  # [size]
    if not mask:
        return dense
    positions, values = [], []
    for name, value in mask.items():
        positions.append(index(name))
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise InvalidArgument(f"{field}[{name!r}] must be a single number", field=field)
            values.append(value.reshape(()).to(device=like.device, dtype=like.dtype))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            values.append(torch.tensor(float(value), device=like.device, dtype=like.dtype))
        else:
            raise InvalidArgument(f"{field}[{name!r}] must be a number, not {value!r}", field=field)
    where = torch.tensor(positions, device=like.device)  # [n]
    return dense.index_put((where,), torch.stack(values))  # [size]
