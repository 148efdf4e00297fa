"""edgeprune.engine: Edge Pruning in pure PyTorch (no gRPC, no SQL), usable as a library."""

from edgeprune.engine.errors import (
    EngineError,
    InvalidArgument,
    ModelNotFound,
    NotSupported,
    ResourceExhausted,
    UnsupportedArchitecture,
)

# Public names imported on first use, so that importing the errors does not load torch/transformers.
_LAZY = {"load_model": "edgeprune.engine.loading"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgeprune.engine' has no attribute {name!r}")


__all__ = [
    "EngineError",
    "InvalidArgument",
    "ModelNotFound",
    "NotSupported",
    "ResourceExhausted",
    "UnsupportedArchitecture",
    "load_model",
]
