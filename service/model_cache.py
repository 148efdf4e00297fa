"""What a worker process keeps between jobs: loaded models and EAP-IG warm-start scores, least
recently used dropped first."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from edgeprune.engine.loading import load_model
from edgeprune.engine.masked import CircuitModel
from edgeprune.engine.prune import PruneConfig
from edgeprune.engine.tasks import TaskDataset

MODEL_CACHE_SIZE = 2
WARM_SCORES_CACHE_SIZE = 16  # EAP-IG warm starts kept per worker: [E] floats each


def resolve_device(requested: str) -> str:
    """The worker's device: ``auto`` is CUDA when there is one."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


class ModelCache:
    """Models loaded in this worker process, least recently used dropped first."""

    def __init__(self, size: int = MODEL_CACHE_SIZE,
                 on_load: Callable[[str, float], None] | None = None) -> None:
        self.size = size
        self.on_load = on_load  # (ref, seconds) after each load
        self.models: OrderedDict[tuple[str, str, str], CircuitModel] = OrderedDict()

    def get(self, ref: str, device: str, dtype: str) -> CircuitModel:
        """``ref`` on ``device`` in ``dtype`` (an engine dtype name)."""
        key = (ref, device, dtype)
        if key in self.models:
            self.models.move_to_end(key)
            return self.models[key]
        start = time.perf_counter()
        model = load_model(ref, device=device, dtype=dtype)
        if self.on_load is not None:
            self.on_load(ref, time.perf_counter() - start)
        self.models[key] = model
        while len(self.models) > self.size:
            self.models.popitem(last=False)
        return model


class WarmScores:
    """EAP-IG warm-start scores computed in this worker process, least recently used dropped
    first: a job on the same model, data and settings as an earlier one (a sweep resubmitted,
    another size) starts without recomputing them."""

    def __init__(self, size: int = WARM_SCORES_CACHE_SIZE) -> None:
        self.size = size
        self.scores: OrderedDict[tuple[Any, ...], torch.Tensor] = OrderedDict()

    @staticmethod
    def key(ref: str, model: CircuitModel, train: TaskDataset, config: PruneConfig
            ) -> tuple[Any, ...]:
        return (ref, str(model.device), model.dtype, train.content_hash, config.ablation,
                config.warm_start_ig_steps, config.batch_size)

    def get(self, key: tuple[Any, ...]) -> torch.Tensor | None:
        if key in self.scores:
            self.scores.move_to_end(key)
            return self.scores[key]
        return None

    def put(self, key: tuple[Any, ...], scores: torch.Tensor) -> None:
        self.scores[key] = scores
        self.scores.move_to_end(key)
        while len(self.scores) > self.size:
            self.scores.popitem(last=False)


WARM_SCORES = WarmScores()
