"""Training state <-> bytes: safetensors for the tensors, JSON for everything else, never pickle.

A checkpoint is one safetensors blob. Its tensors are the run's parameters (``param.<name>``) and
the optimizer's per-parameter state (``optim.<index>.<key>``); its ``__metadata__`` holds one JSON
document with the format tag, the step, the optimizer's non-tensor state and whatever the caller
adds (config, history). Loading validates the format and raises InvalidArgument on anything else.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from edgeprune.engine.errors import InvalidArgument

FORMAT = "edgeprune-train-state/1"


@dataclass
class TrainingState:
    """Everything needed to continue a run: ``step`` steps are done."""

    step: int
    params: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # torch.optim.Optimizer.state_dict()
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable


def to_bytes(state: TrainingState) -> bytes:
    """Serialise ``state`` (tensors are copied to CPU)."""
    tensors: dict[str, torch.Tensor] = {
        f"param.{name}": value.detach().cpu().contiguous() for name, value in state.params.items()
    }
    optim_json: dict[str, dict[str, Any]] = {}
    for index, entry in state.optimizer.get("state", {}).items():
        plain: dict[str, Any] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain[key] = value
        optim_json[str(index)] = plain
    meta = {
        "format": FORMAT,
        "step": state.step,
        "optimizer_state": optim_json,
        "param_groups": state.optimizer.get("param_groups", []),
        "extra": state.extra,
    }
    return st_save(tensors, metadata={"edgeprune": json.dumps(meta)})


def from_bytes(data: bytes) -> TrainingState:
    """Inverse of ``to_bytes``; InvalidArgument if ``data`` is not such a checkpoint."""
    meta = _metadata(data)
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error types on corrupt input
        raise InvalidArgument(f"checkpoint tensors are unreadable: {exc}", field="resume") from exc
    params = {k[len("param.") :]: v for k, v in tensors.items() if k.startswith("param.")}
    state: dict[int, dict[str, Any]] = {
        int(i): dict(plain) for i, plain in meta["optimizer_state"].items()
    }
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    return TrainingState(
        step=int(meta["step"]),
        params=params,
        optimizer={"state": state, "param_groups": meta["param_groups"]},
        extra=meta["extra"],
    )


def _metadata(data: bytes) -> dict[str, Any]:
    """The JSON document in a safetensors blob's header."""
    if not isinstance(data, (bytes, bytearray)) or len(data) < 8:
        raise InvalidArgument("checkpoint is empty or not bytes", field="resume")
    (length,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(bytes(data[8 : 8 + length]))
        meta = json.loads(header["__metadata__"]["edgeprune"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument("not an edgeprune checkpoint", field="resume") from exc
    if meta.get("format") != FORMAT:
        raise InvalidArgument(
            f"checkpoint format {meta.get('format')!r} is not {FORMAT!r}", field="resume"
        )
    return meta
