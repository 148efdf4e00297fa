"""edgeprune.engine: Edge Pruning in pure PyTorch (no gRPC, no SQL), usable as a library."""

from edgeprune.engine.errors import (
    EngineError,
    InvalidArgument,
    ModelNotFound,
    NotSupported,
    ResourceExhausted,
    UnsupportedArchitecture,
)

__all__ = [
    "EngineError",
    "InvalidArgument",
    "ModelNotFound",
    "NotSupported",
    "ResourceExhausted",
    "UnsupportedArchitecture",
]
