"""Fixtures shared by every test package: tiny checkpoints built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny_models import tiny_gpt2, tiny_llama

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine oversubscribed
# OpenMP threads made the engine tests about 10x slower (318 s against 28 s).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 checkpoint folder (load it with ``load_model(f"hf:{dir}")``)."""
    return tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaMA checkpoint folder with grouped-query attention (4 heads, 2 KV heads)."""
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
