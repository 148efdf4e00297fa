"""edgeprune.engine: Edge Pruning in pure PyTorch (no gRPC, no SQL), usable as a library."""

import sys
import types

from edgeprune.engine.errors import (
    EngineError,
    InvalidArgument,
    ModelNotFound,
    NotSupported,
    ResourceExhausted,
    Stopped,
    UnsupportedArchitecture,
)

# Public names imported on first use, so that importing the errors does not load torch/transformers.
_LAZY = {"load_model": "edgeprune.engine.loading"}
_LAZY.update(dict.fromkeys(["evaluate", "evaluate_many"], "edgeprune.engine.metrics"))
_TASK_NAMES = ["Example", "TaskDataset", "build_task", "from_examples", "load_jsonl"]
_LAZY.update(dict.fromkeys(_TASK_NAMES, "edgeprune.engine.tasks"))
_LAZY["export_circuit"] = "edgeprune.engine.export"
_LAZY.update(dict.fromkeys(["prune", "PruneConfig", "PruneResult", "ProgressEvent"], "edgeprune.engine.prune"))
_LAZY.update(dict.fromkeys(["attribute", "acdc", "scored_circuit"], "edgeprune.engine.attribution"))
_LAZY.update(dict.fromkeys(["sweep", "SweepResult", "MIB_SIZES"], "edgeprune.engine.sweep"))
_LAZY["Circuit"] = "edgeprune.engine.circuit"
_LAZY["CircuitModel"] = "edgeprune.engine.masked"
_LAZY["Graph"] = "edgeprune.engine.graph"


# The import system binds every loaded submodule on its package, so once engine/prune.py or
# engine/sweep.py has been imported, `from edgeprune.engine import prune` would give the module.
# The functions of the same name are the public API; the modules stay reachable in full as
# `from edgeprune.engine.prune import ...` (and through sys.modules).
_FUNCTIONS_OVER_MODULES = frozenset({"prune", "sweep"})


class _EngineModule(types.ModuleType):
    def __setattr__(self, name: str, value: object) -> None:
        if name in _FUNCTIONS_OVER_MODULES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _EngineModule


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgeprune.engine' has no attribute {name!r}")


__all__ = [
    "MIB_SIZES",
    "Circuit",
    "CircuitModel",
    "EngineError",
    "Example",
    "Graph",
    "InvalidArgument",
    "ModelNotFound",
    "NotSupported",
    "ProgressEvent",
    "PruneConfig",
    "PruneResult",
    "ResourceExhausted",
    "Stopped",
    "SweepResult",
    "TaskDataset",
    "UnsupportedArchitecture",
    "acdc",
    "attribute",
    "build_task",
    "evaluate",
    "evaluate_many",
    "export_circuit",
    "from_examples",
    "load_jsonl",
    "load_model",
    "prune",
    "scored_circuit",
    "sweep",
]
