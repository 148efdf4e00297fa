"""A job's examples as the engine's datasets: a built-in task, an uploaded dataset or inline
examples, split into training and held-out data."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from edgeprune.engine.tasks import Example, TaskDataset, build_task, from_examples
from edgeprune.service.translate import example_from_proto
from edgeprune.storage import DatasetRepo
from edgeprune.v1 import job_pb2


def _examples(data: job_pb2.DataSpec, datasets: DatasetRepo) -> tuple[str, list[Example]]:
    """(dataset name, examples) of an uploaded dataset or inline examples."""
    if data.WhichOneof("source") == "dataset":
        dataset_id = data.dataset.removeprefix("datasets/")
        rows = [row for batch in datasets.iter_examples(dataset_id) for row in batch]
        return data.dataset, [Example(**row) for row in rows]
    return "custom", [example_from_proto(e) for e in data.examples.examples]


def build_data(data: job_pb2.DataSpec, tokenizer: Any, datasets: DatasetRepo, *,
               seed: int, all_positions: bool) -> tuple[TaskDataset, TaskDataset]:
    """(train, eval) datasets. Built-in tasks use their validation split for eval; uploaded and
    inline examples are split by ``eval_fraction`` (eval = train when too few examples)."""
    if data.WhichOneof("source") == "task":
        task = data.task
        n_eval = max(1, round(task.example_count * data.eval_fraction))
        train = build_task(task.name, tokenizer, n=task.example_count, seed=task.seed,
                           split="train", params=task.params)
        return train, build_task(task.name, tokenizer, n=n_eval, seed=task.seed, split="validation",
                                 params=task.params)
    name, examples = _examples(data, datasets)
    # Tokenise and validate all examples at once, so errors name their index in the request.
    full = from_examples(examples, tokenizer, name=name,
                         all_positions=all_positions or data.examples.all_positions)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = round(len(examples) * data.eval_fraction) if len(examples) >= 2 else 0
    if n_eval == 0:
        return full, full
    train = full.subset(sorted(order[n_eval:]))
    return train, dataclasses.replace(full.subset(sorted(order[:n_eval])), split="validation")


def build_eval_data(data: job_pb2.DataSpec, tokenizer: Any,
                    datasets: DatasetRepo) -> TaskDataset:
    """Every example of the data (a built-in task's validation split)."""
    if data.WhichOneof("source") == "task":
        return build_task(data.task.name, tokenizer, n=data.task.example_count,
                          seed=data.task.seed, split="validation", params=data.task.params)
    name, examples = _examples(data, datasets)
    return from_examples(examples, tokenizer, name=name, split="validation",
                         all_positions=data.examples.all_positions)


def task_name(data: job_pb2.DataSpec) -> str:
    """What a stored circuit's ``task`` says of its data."""
    source = data.WhichOneof("source")
    if source == "task":
        return data.task.name
    return data.dataset if source == "dataset" else "custom"
