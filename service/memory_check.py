"""Does a job fit a worker's memory? Checked at SubmitJob and EvaluateCircuit, from the model's
config alone.

The API process estimates the peak memory of one pruning step (of one evaluation batch, for an
evaluation job) with the engine's arithmetic (`edgeprune.engine.memory`, which imports no torch)
from:

* the model's shape: the `smollm2-135m` preset, or the ``config.json`` of an ``hf:<dir>`` /
  ``tracr:<dir>`` checkpoint (no weights are read), else the config the allow-list records for
  it (``Config.model_configs``: the API pod of a cluster cannot see the workers' model volume);
  a model with neither is not checked;
* the job's batch size, dtype (unset: ``worker_dtype``, else the device's default),
  answer positions, data-parallel share of the batch and activation checkpointing
  (``edge_pruning.activation_checkpointing``);
* a sequence length that the job's longest example cannot be shorter than: one token per
  whitespace-separated word (every tokenizer we load splits at whitespace), or a built-in task's
  shortest prompt. The check therefore rejects only jobs that cannot fit even then.

The budget is `Config.worker_memory_bytes`; 0 means half of this host's physical memory when the
workers run on the CPU (``device`` cpu or auto) and no check for ``cuda`` workers, whose GPU the
API cannot see. `check_fits` keeps 10 % headroom. Workers check again once the data is tokenised
(`runner.check_memory`, exact sequence length, their own device's memory).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from edgeprune.engine import errors as engine_errors
from edgeprune.engine.contract import TASK_MIN_TOKENS, TRACR_MIN_TOKENS
from edgeprune.engine.memory import (
    PRESETS,
    MemoryEstimate,
    ModelShape,
    check_fits,
    device_memory,
    estimate_evaluation_memory,
)
from edgeprune.engine.memory import estimate_job_memory as engine_estimate
from edgeprune.service.config import Config
from edgeprune.service.dataset_check import model_tokenizer
from edgeprune.service.errors import ResourceExhausted
from edgeprune.service.translate import dtype_name
from edgeprune.v1 import common_pb2, job_pb2

log = logging.getLogger(__name__)

CPU_MEMORY_FRACTION = 0.5  # of physical memory, when worker_memory_bytes is 0 on CPU workers
# Longer than any token of the vocabularies we serve (SmolLM2's longest, a newline and 80 spaces,
# is 81 bytes): the token bound of a text when the API cannot read the model's tokenizer.
MAX_TOKEN_BYTES = 128
TOKENIZE_BATCH = 1000


def host_memory_budget() -> int:
    """The default budget of a CPU worker: a fraction of this host's physical memory."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * CPU_MEMORY_FRACTION)


def memory_budget(config: Config) -> int | None:
    """Bytes one job may use on a worker, or None when the API cannot know (GPU workers)."""
    if config.worker_memory_bytes > 0:
        return config.worker_memory_bytes
    return host_memory_budget() if config.device in ("cpu", "auto") else None


def worker_memory_budget(config: Config, device: str) -> int:
    """What a worker on ``device`` checks a job against once its data is tokenised: the setting,
    else its GPU's memory, else the host's default budget."""
    if config.worker_memory_bytes > 0:
        return config.worker_memory_bytes
    if device.startswith("cuda"):
        return device_memory(device) or host_memory_budget()  # imports torch: workers only
    return host_memory_budget()


@functools.lru_cache(maxsize=64)
def model_shape(ref: str) -> ModelShape | None:
    """The shape of an allow-listed model reference, or None when its config is out of reach."""
    if ref in PRESETS:
        return PRESETS[ref]
    kind, _, target = ref.partition(":")
    if kind not in ("hf", "tracr") or not (Path(target) / "config.json").is_file():
        return None
    try:
        return ModelShape.from_config_file(target)
    except engine_errors.InvalidArgument as err:  # the worker reports the real problem
        log.warning("no memory estimate for %s: %s", ref, err)
        return None


def allow_listed_shape(config: Config, ref: str) -> ModelShape | None:
    """The shape of allow-listed ``ref``: from its own config file where this process can read
    it, else from the config the allow-list records for it; None when neither."""
    shape = model_shape(ref)
    if shape is not None:
        return shape
    for name, recorded in config.model_configs.items():
        if config.models.get(name) == ref:
            return ModelShape.from_config(recorded, name=name)  # validated with the config
    return None


def estimate_dtype(config: Config) -> str:
    """The dtype the workers run a job in that names none, which the estimate assumes."""
    return dtype_name(common_pb2.DTYPE_UNSPECIFIED, config.device, config.worker_dtype)


def min_tokens(prompts: Iterable[str | list[int]], tokenizer: Any | None = None) -> int:
    """The fewest tokens the longest of ``prompts`` can have.

    Exact with the model's tokenizer (and for prompts given as token ids). Without it, a bound no
    tokenizer goes below: tokens do not span whitespace, and none is longer than MAX_TOKEN_BYTES,
    so a word of n bytes is at least ceil(n / MAX_TOKEN_BYTES) tokens.
    """
    longest = 1
    texts: list[str] = []

    def count_texts() -> int:
        if tokenizer is not None:
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
            return max(map(len, ids), default=1)
        return max((sum(-(-len(w.encode()) // MAX_TOKEN_BYTES) for w in t.split())
                    for t in texts), default=1)

    for prompt in prompts:
        if isinstance(prompt, list):
            longest = max(longest, len(prompt))
            continue
        texts.append(prompt)
        if len(texts) == TOKENIZE_BATCH:
            longest, texts = max(longest, count_texts()), []
    return max(longest, count_texts()) if texts else longest


def data_shape(data: job_pb2.DataSpec, dataset_shape: Callable[[str], tuple[int, int]], *,
               evaluation: bool = False, tokenizer: Any | None = None) -> tuple[int, int]:
    """(sequence length lower bound, number of training examples) of a normalised job's data, or
    with ``evaluation`` of every example (an evaluation job's data, see job_data.build_eval_data).
    ``dataset_shape(id)`` gives (length bound, example count) of an uploaded dataset; inline
    examples are counted with ``tokenizer`` when the API has the model's."""
    source = data.WhichOneof("source")
    if source == "task":  # the held-out examples are generated apart
        return TASK_MIN_TOKENS.get(data.task.name, TRACR_MIN_TOKENS), data.task.example_count
    if source == "dataset":
        tokens, count = dataset_shape(data.dataset.removeprefix("datasets/"))
    else:
        examples = data.examples.examples
        tokens, count = min_tokens((e.clean for e in examples), tokenizer), len(examples)
    if evaluation:
        return tokens, count
    held_out = round(count * data.eval_fraction) if count >= 2 else 0  # as job_data.build_data
    return tokens, count - held_out


def estimate(spec: job_pb2.JobSpec | job_pb2.EvaluationSpec, shape: ModelShape, *, seq_len: int,
             n_examples: int, answer_positions: int, dtype: str, on_gpu: bool) -> MemoryEstimate:
    """The peak of one pruning step of ``spec`` (a normalised spec), or of one evaluation batch
    for an EvaluationSpec, on one worker device (the API and the workers both call this).
    Data-parallel ranks on GPUs each hold their share of the batch; on the CPU they share one
    memory, so the whole batch counts."""
    answer_positions = min(answer_positions, seq_len)
    if isinstance(spec, job_pb2.EvaluationSpec):
        return estimate_evaluation_memory(shape, batch_size=spec.batch_size, seq_len=seq_len,
                                          dtype=dtype, n_examples=n_examples,
                                          answer_positions=answer_positions)
    world = max(1, spec.data_parallel_workers) if on_gpu else 1
    batch = min(spec.batch_size, n_examples) if n_examples else spec.batch_size
    return engine_estimate(shape, batch_size=batch, seq_len=seq_len, dtype=dtype,
                           answer_positions=answer_positions, n_examples=n_examples,
                           world_size=world,
                           activation_checkpointing=spec.edge_pruning.activation_checkpointing,
                           warm_start=spec.method == common_pb2.METHOD_EDGE_PRUNING
                           and spec.edge_pruning.warm_start != job_pb2.WARM_START_NONE)


def check_job_memory(spec: job_pb2.JobSpec | job_pb2.EvaluationSpec, ref: str, config: Config,
                     dataset_shape: Callable[[str], tuple[int, int]]) -> MemoryEstimate | None:
    """RESOURCE_EXHAUSTED (reason INSUFFICIENT_DEVICE_MEMORY, the estimate in the message and in
    ErrorInfo metadata) when the job (a pruning job, or an evaluation of a stored circuit of
    model ``ref``) cannot fit; the estimate, or None when not checked."""
    budget = memory_budget(config)
    shape = allow_listed_shape(config, ref)
    if budget is None or shape is None:
        return None
    evaluation = isinstance(spec, job_pb2.EvaluationSpec)
    tokenizer = model_tokenizer(ref) if spec.data.WhichOneof("source") == "examples" else None
    seq_len, n_examples = data_shape(spec.data, dataset_shape, evaluation=evaluation,
                                     tokenizer=tokenizer)
    on_gpu = config.device.startswith("cuda")
    all_positions = spec.data.examples.all_positions or (
        not evaluation and spec.positions == common_pb2.POSITION_MODE_ALL)
    est = estimate(spec, shape, seq_len=seq_len, n_examples=n_examples,
                   answer_positions=seq_len if all_positions else 1,
                   dtype=dtype_name(spec.dtype, config.device, config.worker_dtype),
                   on_gpu=on_gpu)
    try:
        check_fits(est, budget)
    except engine_errors.ResourceExhausted as err:
        raise ResourceExhausted(str(err), reason="INSUFFICIENT_DEVICE_MEMORY", metadata={
            "estimate_bytes": str(est.total),
            "budget_bytes": str(budget),
            "seq_len_at_least": str(seq_len),
            "batch_size": str(spec.batch_size),
            "dtype": est.settings["dtype"],
            "activation_checkpointing": str(est.settings["activation_checkpointing"]).lower(),
        }) from err
    return est
