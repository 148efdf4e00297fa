"""Per-family adapters for the generic masked forward, found through the ``ADAPTERS`` registry.

Keys are Hugging Face ``config.model_type`` values, plus ``"tracr"`` for
``edgeprune.engine.tracr_model.TracrModel`` instances.
"""

from __future__ import annotations

from torch import nn

from edgeprune.engine.adapters.base import Adapter
from edgeprune.engine.adapters.gemma import GemmaAdapter
from edgeprune.engine.adapters.gemma2 import Gemma2Adapter
from edgeprune.engine.adapters.gpt2 import GPT2Adapter
from edgeprune.engine.adapters.gpt_neox import GPTNeoXAdapter
from edgeprune.engine.adapters.llama import LlamaAdapter
from edgeprune.engine.adapters.olmo import OlmoAdapter
from edgeprune.engine.adapters.olmo2 import Olmo2Adapter
from edgeprune.engine.adapters.phi3 import Phi3Adapter
from edgeprune.engine.adapters.qwen3 import Qwen3Adapter
from edgeprune.engine.adapters.tracr import TracrAdapter
from edgeprune.engine.errors import UnsupportedArchitecture

ADAPTERS: dict[str, type[Adapter]] = {
    "gpt2": GPT2Adapter,
    "gpt_neox": GPTNeoXAdapter,
    "llama": LlamaAdapter,
    "qwen2": LlamaAdapter,
    "mistral": LlamaAdapter,
    "qwen3": Qwen3Adapter,
    "phi3": Phi3Adapter,
    "olmo": OlmoAdapter,
    "olmo2": Olmo2Adapter,
    "gemma": GemmaAdapter,
    "gemma2": Gemma2Adapter,
    "tracr": TracrAdapter,
}


def model_type(module: nn.Module) -> str:
    """The registry key for ``module``: "tracr" for a TracrModel, else its HF ``config.model_type``."""
    if type(module).__name__ == "TracrModel":
        return "tracr"
    return str(getattr(getattr(module, "config", None), "model_type", type(module).__name__))


def adapter_for(module: nn.Module) -> Adapter:
    """The adapter for ``module``; UnsupportedArchitecture naming the supported ones otherwise."""
    kind = model_type(module)
    if kind not in ADAPTERS:
        raise UnsupportedArchitecture(
            f"architecture {kind!r} is not supported; supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[kind](module)


__all__ = ["ADAPTERS", "Adapter", "adapter_for", "model_type"]
