"""The built-in task generators, by name, and :func:`build_task`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from edgeprune.engine.errors import InvalidArgument
from edgeprune.engine.task_params import Param, parse_params
from edgeprune.engine.tasks.base import Example, Metric, TaskDataset, from_examples
from edgeprune.engine.tasks.tracr import PREFIX as TRACR_PREFIX
from edgeprune.engine.tasks.tracr import tracr_examples
from edgeprune.engine.tracr_model import TracrTokenizer


@dataclass(frozen=True)
class TaskSpec:
    """A built-in task: how to generate its examples, which metric its faithfulness uses, and
    the parameters its generator takes (``generate`` gets them typed, as keyword arguments)."""

    name: str
    metric: Metric
    description: str
    generate: Callable[..., list[Example]]  # (tokenizer, *, n, seed, split, **params) -> examples
    all_positions: bool = False
    skip_first: bool = False
    params: tuple[Param, ...] = ()


TASKS: dict[str, TaskSpec] = {}
# Any name "tracr_<program>" builds inputs for the compiled program the tokenizer belongs to.
TRACR_TASK = TaskSpec(
    name="tracr_*",
    metric="logit_diff",
    generate=tracr_examples,
    all_positions=True,
    skip_first=True,
    description="Every position of a compiled Tracr program (KL, exact match)",
)


def register(spec: TaskSpec) -> TaskSpec:
    """Add a task to :data:`TASKS` (its name must be new)."""
    if spec.name in TASKS:
        raise ValueError(f"task {spec.name!r} is already registered")
    TASKS[spec.name] = spec
    return spec


def build_task(
    name: str,
    tokenizer: Any,
    *,
    n: int,
    seed: int = 0,
    split: str = "train",
    params: Mapping[str, Any] | None = None,
) -> TaskDataset:
    """``n`` examples of the built-in task ``name`` for this tokenizer, as a validated dataset.

    The same (tokenizer, name, seed, split, n, params) always gives the same dataset; the train,
    validation and test splits never share an example. ``name`` is one of :data:`TASKS`, or
    "tracr_<program>" with a tracr model's tokenizer. ``params``: the generator's parameters
    (``TaskSpec.params``), as text or typed values; unknown keys and bad values raise
    InvalidArgument on ``params['key']``.
    """
    spec = TRACR_TASK if name.startswith(TRACR_PREFIX) else TASKS.get(name)
    if spec is None:
        raise InvalidArgument(
            f"unknown task {name!r}; built-in tasks: {', '.join(sorted(TASKS))} "
            f"and {TRACR_PREFIX}<program> for tracr models",
            field="task",
        )
    if isinstance(tokenizer, TracrTokenizer) and spec is not TRACR_TASK:
        raise InvalidArgument(
            f"task {name!r} needs a language model; a tracr model takes {TRACR_PREFIX}* tasks",
            field="task",
        )
    typed = parse_params(spec.params, params, task=name)
    examples = spec.generate(tokenizer, n=n, seed=seed, split=split, **typed)
    return from_examples(
        examples,
        tokenizer,
        name=name,
        split=split,
        metric=spec.metric,
        all_positions=spec.all_positions,
        skip_first=spec.skip_first,
    )
