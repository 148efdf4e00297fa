"""Data-parallel pruning jobs: one process per device, masks replicated, gradients all-reduced.

:func:`prune_data_parallel` spawns ``world_size`` processes (``torch.multiprocessing``, start
method "spawn": never forked after gRPC or CUDA start). Each loads the model itself from a
:class:`ModelSpec`, joins a process group (``nccl`` on GPUs, ``gloo`` on CPU) through a file
store (no port to pick) and runs :func:`edgeprune.engine.prune.prune` with ``distributed=True``:
every rank takes its share of each batch and ``prune`` averages the mask and lambda gradients
across ranks before each optimizer step, so N ranks compute what one rank computes on the whole
batch (up to the order of floating-point sums).

Rank 0 reports to the calling process through a queue: progress events and checkpoints go to the
caller's callbacks (in the caller's thread), and its :class:`PruneResult` is returned.
``should_stop`` is polled in the caller; the ranks agree on stopping with an all-reduce, so they
always stop after the same step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import queue
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from edgeprune.engine.errors import EngineError, InvalidArgument, Stopped

log = logging.getLogger(__name__)

__all__ = ["ModelSpec", "default_backend", "default_world_size", "prune_data_parallel"]


@dataclass(frozen=True)
class ModelSpec:
    """What each rank loads: ``load_model(ref, device=<its device>, dtype=..., cache_dir=...)``."""

    ref: str
    dtype: str = "float32"
    cache_dir: str | None = None

    def load(self, device: torch.device) -> Any:
        from edgeprune.engine.loading import load_model

        return load_model(self.ref, device=device, dtype=self.dtype, cache_dir=self.cache_dir)


def default_backend(device_type: str) -> str:
    """``nccl`` for CUDA devices, ``gloo`` for CPU."""
    return "nccl" if device_type == "cuda" else "gloo"


def default_world_size(device_type: str) -> int:
    """Every visible GPU on a CUDA host; 1 on CPU."""
    return torch.cuda.device_count() if device_type == "cuda" else 1


# ---- what every rank runs ----------------------------------------------------------------------


@dataclass(frozen=True)
class _RankArgs:
    spec: ModelSpec
    dataset: Any  # TaskDataset
    config: Any  # PruneConfig
    device_type: str
    backend: str
    store_path: str
    checkpoint_every: int
    resume: bytes | None


def _rank_main(rank: int, world: int, args: _RankArgs, events: Any, stop: Any) -> None:
    """One rank: join the group, load the model, prune; rank 0 sends events and the result."""
    from edgeprune.engine.prune import prune

    device = (
        torch.device(args.device_type, rank) if args.device_type == "cuda" else torch.device("cpu")
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(
            args.backend, init_method=f"file://{args.store_path}", rank=rank, world_size=world
        )
        model = args.spec.load(device)
        flag = torch.zeros(1, device=device)  # [1]: 1 when any rank was asked to stop

        def should_stop() -> bool:
            flag.fill_(1.0 if stop.is_set() else 0.0)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank calls this once per step
            return bool(flag.item())

        lead = rank == 0
        result = prune(
            model,
            args.dataset,
            dataclasses.replace(args.config, distributed=True),
            progress=(lambda event: events.put(("progress", event))) if lead else None,
            checkpoint_every=args.checkpoint_every,
            on_checkpoint=(lambda data: events.put(("checkpoint", data))) if lead else None,
            resume=args.resume,
            should_stop=should_stop,
        )
        if lead:  # as bytes: shared-memory tensors would die with this process
            buffer = io.BytesIO()
            torch.save(result, buffer)
            events.put(("result", buffer.getvalue()))
    except BaseException as exc:  # the caller re-raises it with the rank's traceback
        events.put(("error", (rank, repr(exc), traceback.format_exc(), _engine_error(exc))))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _engine_error(exc: BaseException) -> tuple[str, str, str | None] | None:
    """(class name, message, field) of an engine error, so the caller can raise the same kind."""
    if isinstance(exc, (EngineError, Stopped)):  # Stopped: asked to stop during the preparation
        return type(exc).__name__, str(exc), getattr(exc, "field", None)
    return None


# ---- the caller's side -------------------------------------------------------------------------


def prune_data_parallel(
    spec: ModelSpec,
    dataset: Any,
    config: Any,
    *,
    world_size: int | None = None,
    device_type: str = "cpu",
    backend: str | None = None,
    progress: Callable[[Any], None] | None = None,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[bytes], None] | None = None,
    resume: bytes | None = None,
    should_stop: Callable[[], bool] | None = None,
    poll_seconds: float = 0.2,
) -> Any:
    """Prune over ``world_size`` processes (default: every GPU, or 1 on CPU); rank 0's result.

    The arguments mirror :func:`edgeprune.engine.prune.prune`; callbacks run in this process.
    """
    if device_type not in ("cpu", "cuda"):
        raise InvalidArgument(
            f"device_type must be 'cpu' or 'cuda', got {device_type!r}", field="device_type"
        )
    world = default_world_size(device_type) if world_size is None else world_size
    if world < 1:
        raise InvalidArgument(f"world_size must be >= 1, got {world}", field="world_size")
    if device_type == "cuda" and world > torch.cuda.device_count():
        raise InvalidArgument(
            f"world_size {world} exceeds the {torch.cuda.device_count()} visible GPUs",
            field="world_size",
        )
    if config.batch_size < world:
        raise InvalidArgument(
            f"batch_size {config.batch_size} is smaller than the {world} ranks", field="batch_size"
        )
    context = mp.get_context("spawn")
    events = context.Queue()
    stop = context.Event()
    with tempfile.TemporaryDirectory(prefix="edgeprune-dist-") as tmp:
        args = _RankArgs(
            spec=spec,
            dataset=dataset,
            config=config,
            device_type=device_type,
            backend=backend or default_backend(device_type),
            store_path=str(Path(tmp) / "store"),
            checkpoint_every=checkpoint_every,
            resume=resume,
        )
        procs = mp.start_processes(
            _rank_main,
            args=(world, args, events, stop),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        result, error = None, None
        try:
            done = False
            while not done or not events.empty():
                if should_stop is not None and not stop.is_set() and should_stop():
                    stop.set()
                with contextlib.suppress(queue.Empty):
                    kind, payload = events.get(timeout=poll_seconds)
                    if kind == "progress" and progress is not None:
                        progress(payload)
                    elif kind == "checkpoint" and on_checkpoint is not None:
                        on_checkpoint(payload)
                    elif kind == "result":
                        result = torch.load(io.BytesIO(payload), weights_only=False)
                    elif kind == "error" and error is None:
                        error = payload
                if not done:
                    try:
                        done = procs.join(timeout=0)
                    except mp.ProcessRaisedException:
                        done = True  # the rank's own error arrives on the queue
                    except mp.ProcessExitedException as exc:
                        done = True
                        if error is None:
                            error = (exc.error_index, f"exit code {exc.exit_code}", "", None)
        finally:
            for process in procs.processes:
                if process.is_alive():
                    process.terminate()
                process.join()
    if error is not None:
        _raise(error)
    if result is None:
        raise EngineError("the data-parallel run ended without a result")
    return result


def _raise(error: tuple[int, str, str, tuple[str, str, str | None] | None]) -> None:
    """Re-raise a rank's error: the same engine error class where it was one."""
    from edgeprune.engine import errors

    rank, text, trace, engine = error
    log.error("rank %d failed: %s\n%s", rank, text, trace)
    if engine is not None:
        name, message, field = engine
        cls = getattr(errors, name, EngineError)
        if issubclass(cls, InvalidArgument):
            raise cls(message, field=field)
        raise cls(message)
    raise EngineError(f"data-parallel rank {rank} failed: {text}")
