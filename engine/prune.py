"""Edge Pruning (Bhaskar et al. 2024): learn hard-concrete edge and node masks by gradient descent.

The loss is ``L = L_task + lambda1 (t - s) + lambda2 (t - s)^2`` where ``L_task`` is KL(full ||
circuit) at the answer positions (or a logit-difference loss), ``s`` the expected edge sparsity
(the mean of ``1 - P(z_e > 0)``) and ``t`` a target rising linearly from the initial sparsity to its final value over a
warm-up. lambda1 and lambda2 start at 0 and follow gradient *ascent* (AdamW ``maximize``). An optional node Lagrangian
does the same for node sparsity. AdamW has one parameter group each for edges, nodes and lambdas.

Each step draws one mask sample for the whole batch from a generator seeded by (seed, step), and
takes its rows from a seeded permutation of the dataset, so the run is deterministic on CPU and a
resumed run (``resume=`` bytes from ``on_checkpoint``) is exactly the uninterrupted one. The full
model's logits and the ablation values come from :class:`~edgeprune.engine.cache.ActivationCache`.

The defaults (``engine/defaults.py``) are a recipe that reaches the requested size without
tuning: the edge masks start from EAP-IG scores (the top edges of the requested size on, the rest
off and in score order), small learning rates refine that start, and the sparsity target and
warm-ups are fractions of ``steps``. The paper's own setting (every mask on, 3000 steps, learning
rates 0.8) is ``warm_start=None`` with those values.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from edgeprune.engine import defaults, diagnostics, masks, objective
from edgeprune.engine.attribution import eap_ig_scores
from edgeprune.engine.cache import DEFAULT_BUDGET_BYTES, ActivationCache
from edgeprune.engine.checkpoint import TrainingState, from_bytes, to_bytes
from edgeprune.engine.circuit import (
    Circuit,
    build_circuit,
    circuit_from_keep,
    live_edges,
    requested_edges,
    select_top,
    size_target,
    top_edges,
)
from edgeprune.engine.errors import InvalidArgument
from edgeprune.engine.graph import Graph
from edgeprune.engine.masked import CircuitModel
from edgeprune.engine.refine import minimal_circuit
from edgeprune.engine.tasks import TaskDataset

log = logging.getLogger(__name__)


@dataclass
class PruneConfig:
    """Settings of one Edge Pruning run (see the module doc for the defaults' origin).

    Size of the returned circuit: ``edge_count`` or ``edge_sparsity`` (at most one); with neither, the
    smallest top-ranked circuit whose training loss is at most ``kl_tolerance`` when that is set
    (found by bisection on the ranking: exact recovery, e.g. of Tracr programs), else the masks'
    own expected number of edges. ``edge_target`` is the final sparsity target of the
    Lagrangian (None: the requested sparsity, or 1.02 when none is requested).

    Runs warm-started from EAP-IG (``warm_start="eap_ig"``, the default) want small learning
    rates: Adam's first steps move every log_alpha by about +-lr, so at the paper's 0.8 a few
    dozen steps scramble the warm start before the KL gradient has sorted anything.
    """

    steps: int = defaults.STEPS
    batch_size: int = defaults.BATCH_SIZE
    edge_lr: float = defaults.MASK_LEARNING_RATE
    node_lr: float = defaults.MASK_LEARNING_RATE
    lambda_lr: float = defaults.LAMBDA_LEARNING_RATE
    weight_decay: float = 0.0  # on the log_alphas (lambdas never decay)
    grad_clip: float | None = None  # max global norm of the mask gradients
    lr_warmup_steps: int | None = None  # None: defaults.lr_warmup_steps(steps)
    target_warmup_steps: int | None = None  # None: defaults.target_warmup_steps(steps)
    edge_count: int | None = None
    edge_sparsity: float | None = None
    edge_target: float | None = None
    node_masks: bool = True
    node_loss: bool = False
    node_target: float = 0.5  # final node sparsity target when node_loss is on
    loss: str = "kl"
    ablation: str = "corrupted"
    seed: int = 0
    init_mean: float = masks.INIT_MEAN
    init_std: float = masks.INIT_STD
    kl_tolerance: float | None = None  # no size asked: smallest top-ranked circuit within it
    warm_start: str | None = defaults.WARM_START  # "eap_ig" (scores) or None (every mask on)
    warm_start_ig_steps: int = defaults.WARM_START_IG_STEPS
    warm_start_scale: float = defaults.WARM_START_SCALE  # top log_alphas start in (0, scale]
    warm_start_floor: float | None = defaults.WARM_START_FLOOR  # the rest in [-floor, 0)
    cache_bytes: int = DEFAULT_BUDGET_BYTES
    distributed: bool = False
    activation_checkpointing: bool = False  # recompute layer internals in backward (less memory)
    # Factor on the Lagrangian terms; None: the square root of the number of masks, so the
    # pressure on each mask falls slower than 1/E as graphs grow (1.0: the paper's).
    lagrangian_scale: float | None = defaults.LAGRANGIAN_SCALE

    def validate(self, model: CircuitModel, dataset: TaskDataset) -> None:
        """InvalidArgument naming the first bad field."""
        ints = {"steps": 1, "batch_size": 1, "warm_start_ig_steps": 1, "cache_bytes": 0}
        for name, low in ints.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidArgument(f"{name} must be an integer >= {low}, got {value!r}", field=name)
        for name in ("lr_warmup_steps", "target_warmup_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise InvalidArgument(f"{name} must be an integer >= 0, got {value!r}", field=name)
        for name in ("edge_lr", "node_lr", "lambda_lr", "weight_decay", "init_std",
                     "warm_start_scale", "warm_start_floor"):
            value = getattr(self, name)
            if value is None and name == "warm_start_floor":
                continue
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InvalidArgument(f"{name} must be a finite number >= 0, got {value!r}", field=name)
        if self.grad_clip is not None and not (
            isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0
        ):
            raise InvalidArgument(f"grad_clip must be > 0 or None, got {self.grad_clip!r}", field="grad_clip")
        if self.lagrangian_scale is not None and not (
            isinstance(self.lagrangian_scale, (int, float)) and math.isfinite(self.lagrangian_scale)
            and self.lagrangian_scale > 0
        ):
            raise InvalidArgument(f"lagrangian_scale must be > 0 or None, got {self.lagrangian_scale!r}",
                                  field="lagrangian_scale")
        if self.kl_tolerance is not None and not (
            isinstance(self.kl_tolerance, (int, float)) and self.kl_tolerance >= 0
        ):
            raise InvalidArgument(f"kl_tolerance must be >= 0 or None, got {self.kl_tolerance!r}",
                                  field="kl_tolerance")
        for name in ("edge_target", "node_target"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 <= value <= 2):
                raise InvalidArgument(f"{name} must be in [0, 2], got {value!r}", field=name)
        if self.ablation not in ("corrupted", "zero", "mean"):
            raise InvalidArgument(f"unknown ablation {self.ablation!r}", field="ablation")
        if self.warm_start not in (None, "eap_ig"):
            raise InvalidArgument(f"warm_start must be None or 'eap_ig', got {self.warm_start!r}",
                                  field="warm_start")
        if not isinstance(self.activation_checkpointing, bool):
            raise InvalidArgument("activation_checkpointing must be true or false",
                                  field="activation_checkpointing")
        if self.node_loss and not self.node_masks:
            raise InvalidArgument("node_loss needs node_masks", field="node_loss")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not (
            -defaults.MAX_SEED <= self.seed <= defaults.MAX_SEED
        ):
            raise InvalidArgument(f"seed must be an integer in [-{defaults.MAX_SEED}, "
                                  f"{defaults.MAX_SEED}], got {self.seed!r}", field="seed")
        objective.check_loss(self.loss, dataset)
        requested_edges(model.graph, edge_count=self.edge_count, edge_sparsity=self.edge_sparsity)

    @property
    def lr_warmup(self) -> int:
        if self.lr_warmup_steps is None:
            return defaults.lr_warmup_steps(self.steps)
        return self.lr_warmup_steps

    @property
    def target_warmup(self) -> int:
        if self.target_warmup_steps is None:
            return defaults.target_warmup_steps(self.steps)
        return self.target_warmup_steps

    def lagrangian_factor(self, n_masks: int) -> float:
        """The factor on a Lagrangian over ``n_masks`` masks."""
        if self.lagrangian_scale is None:
            return math.sqrt(n_masks)
        return float(self.lagrangian_scale)

    def requested_edges(self, graph: Graph) -> int | None:
        """The circuit size asked for by ``edge_count`` or ``edge_sparsity``, or None."""
        return requested_edges(graph, edge_count=self.edge_count, edge_sparsity=self.edge_sparsity)

    def final_edge_target(self, graph: Graph) -> float:
        """The sparsity target at the end of the warm-up."""
        if self.edge_target is not None:
            return float(self.edge_target)
        wanted = self.requested_edges(graph)
        return 1.02 if wanted is None else 1.0 - wanted / graph.n_edges


@dataclass
class PhaseProgress:
    """What a progress callback receives while the run prepares: ``phase`` is "cache" (the full
    model's logits and the ablation values) or "warm_start" (EAP-IG scores); ``step`` of
    ``total_steps`` passes done."""

    phase: str
    step: int
    total_steps: int


@dataclass
class ProgressEvent:
    """What a progress callback receives after every training step."""

    step: int  # steps done
    total_steps: int
    loss: float
    task_loss: float  # the loss named by loss_name
    loss_name: str  # "kl", "logit_diff" or "mse"
    sparsity_loss: float
    expected_sparsity: float  # of the edge masks
    node_sparsity: float | None
    target: float
    lambdas: dict[str, float]
    steps_per_s: float


@dataclass
class PruneResult:
    """The trained masks, the circuit cut from them, and the per-step history."""

    edge_log_alpha: torch.Tensor  # [E]
    node_log_alpha: torch.Tensor | None  # [W]
    circuit: Circuit
    history: list[dict[str, Any]]
    steps_done: int
    stopped: bool  # should_stop() ended the run early
    config: PruneConfig
    edge_writer: torch.Tensor  # writer index of every edge [E] (Graph.edge_writer)
    warm_scores: torch.Tensor | None = None  # [E] the EAP-IG scores it started from, to reuse
    reached_sparsity: float = math.nan  # the masks' expected edge sparsity at the end
    target_sparsity: float = math.nan  # the Lagrangian's final target
    warnings: list[diagnostics.ResultWarning] = dataclasses.field(default_factory=list)

    def scores(self) -> torch.Tensor:
        """Ranking score of every edge [E]: its log_alpha, capped by its writer node's."""
        return edge_scores(self.edge_log_alpha, self.node_log_alpha, self.edge_writer)

    def circuit_at(self, model: CircuitModel, *, edge_count: int | None = None,
                   edge_sparsity: float | None = None) -> Circuit:
        """Another circuit cut from the same masks, at ``edge_count`` or ``edge_sparsity``."""
        k = requested_edges(model.graph, edge_count=edge_count, edge_sparsity=edge_sparsity)
        if k is None:
            raise InvalidArgument("give edge_count or edge_sparsity", field="edge_count")
        target = size_target(edge_count, edge_sparsity)
        return build_circuit(
            model.graph, self.scores(), edge_count=k, model=self.circuit.model, method="edge_pruning",
            target=target, settings=self.circuit.settings, provenance=self.circuit.provenance,
        )


def edge_scores(
    edge_log_alpha: torch.Tensor, node_log_alpha: torch.Tensor | None, edge_writer: torch.Tensor
) -> torch.Tensor:
    """Per-edge ranking score [E]: an edge is as kept as the lesser of its own and its writer's mask."""
    scores = edge_log_alpha.detach().float().cpu()  # [E]
    if node_log_alpha is None:
        return scores
    return torch.minimum(scores, node_log_alpha.detach().float().cpu()[edge_writer])  # [E]


# ---- schedule and data order ---------------------------------------------------------------------


def target_at(step: int, start: float, final: float, warmup: int) -> float:
    """The sparsity target at ``step``: linear from ``start`` to ``final`` over ``warmup`` steps."""
    if warmup <= 0:
        return final
    return start + (final - start) * min(1.0, step / warmup)


def lr_scale(step: int, warmup: int) -> float:
    """Learning-rate factor at ``step`` (0-based): linear warm-up to 1 over ``warmup`` steps."""
    return 1.0 if warmup <= 0 else min(1.0, (step + 1) / warmup)


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * defaults.SEED_STRIDE + epoch)
    return torch.randperm(n, generator=generator)  # [N]


def batch_rows(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Rows of step ``step``: the next ``batch_size`` of a stream of seeded permutations: [B]."""
    stream = torch.arange(step * batch_size, (step + 1) * batch_size)  # [B]
    epochs, offsets = stream // n, stream % n
    return torch.stack([_permutation(n, seed, int(e))[int(o)] for e, o in zip(epochs, offsets)])


def _step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * defaults.SEED_STRIDE + step + 1)


# ---- the run -------------------------------------------------------------------------------------


class _Run:
    """Parameters, optimizer and bookkeeping of one pruning run."""

    def __init__(self, model: CircuitModel, dataset: TaskDataset, config: PruneConfig) -> None:
        self.model, self.dataset, self.config = model, dataset, config
        graph, device = model.graph, model.device
        generator = torch.Generator().manual_seed(config.seed)
        init = functools.partial(
            masks.init_log_alpha, generator=generator, device=device,
            mean=config.init_mean, std=config.init_std,
        )
        self.edge_la = init(graph.n_edges).requires_grad_(True)  # [E]
        self.node_la = init(graph.n_writers).requires_grad_(True) if config.node_masks else None  # [W]
        n_lambdas = 4 if config.node_loss else 2
        self.lambdas = torch.zeros(n_lambdas, device=device, requires_grad=True)  # [l1, l2, (n1, n2)]
        groups: list[dict[str, Any]] = [
            {"params": [self.edge_la], "lr": config.edge_lr, "weight_decay": config.weight_decay,
             "name": "edges", "base_lr": config.edge_lr},
        ]
        if self.node_la is not None:
            groups.append({"params": [self.node_la], "lr": config.node_lr,
                           "weight_decay": config.weight_decay, "name": "nodes",
                           "base_lr": config.node_lr})
        groups.append({"params": [self.lambdas], "lr": config.lambda_lr, "weight_decay": 0.0,
                       "maximize": True, "name": "lambdas", "base_lr": config.lambda_lr})
        self.optimizer = torch.optim.AdamW(groups)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.start_sparsity = 0.0
        self.warm_scores: torch.Tensor | None = None  # [E], when the run warm-started

    def params(self) -> dict[str, torch.Tensor]:
        out = {"edge_log_alpha": self.edge_la, "lambdas": self.lambdas}
        if self.node_la is not None:
            out["node_log_alpha"] = self.node_la
        return out

    def expected_sparsity(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(expected edge sparsity, expected node sparsity or None): differentiable scalars.

        As in the original code, the edge term counts the edge masks alone: folding the node masks
        in lets the Lagrangian switch whole nodes off, which is cheap for it and bad for the KL.
        """
        edge_sparsity = 1.0 - masks.keep_probability(self.edge_la).mean()
        if self.node_la is None:
            return edge_sparsity, None
        return edge_sparsity, 1.0 - masks.keep_probability(self.node_la).mean()

    def train_step(self, cache: ActivationCache, final_target: float, *, rank: int = 0,
                   world: int = 1) -> dict[str, Any]:
        """One optimizer step on this rank's share of the step's batch; returns its history entry."""
        config, model, step = self.config, self.model, self.step
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_scale(step, config.lr_warmup)
        target = target_at(step, self.start_sparsity, final_target, config.target_warmup)
        node_target = target_at(step, 0.0, config.node_target, config.target_warmup)

        generator = _step_generator(config.seed, step, model.device)
        z_edges = masks.sample(self.edge_la, generator)  # [E]
        z_nodes = None if self.node_la is None else masks.sample(self.node_la, generator)  # [W]
        index = batch_rows(len(self.dataset), config.batch_size, config.seed, step)  # [B]
        mine = index[rank::world]  # this rank's share [B / world]
        batch = cache.batch(mine, scratch=True)  # done with before the next step's
        with model.checkpointing(config.activation_checkpointing):  # decided in the forward pass
            logits = cache.logits(batch, z_edges, z_nodes)  # [b, P, V]
        # Weighted so that the mean over ranks of the local losses is the loss of the whole batch.
        task = objective.loss(config.loss, batch, logits) * (len(mine) * world / len(index))

        sparsity, node_sparsity = self.expected_sparsity()
        graph = model.graph
        sparsity_loss = config.lagrangian_factor(graph.n_edges) * _lagrangian(
            self.lambdas[0], self.lambdas[1], target, sparsity)
        if config.node_loss:
            assert node_sparsity is not None
            sparsity_loss = sparsity_loss + config.lagrangian_factor(graph.n_writers) * _lagrangian(
                self.lambdas[2], self.lambdas[3], node_target, node_sparsity)
        self.optimizer.zero_grad(set_to_none=False)
        (task + sparsity_loss).backward()
        task_value = task.detach().clone()
        mask_params = [p for p in (self.edge_la, self.node_la) if p is not None]
        if world > 1:
            for p in [*mask_params, self.lambdas]:
                assert p.grad is not None
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(world)
            dist.all_reduce(task_value, op=dist.ReduceOp.SUM)
            task_value.div_(world)
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(mask_params, config.grad_clip)
        self.optimizer.step()  # the lambda group maximises: gradient ascent
        self.step += 1
        names = ("edge_l1", "edge_l2", "node_l1", "node_l2")
        return {
            "step": self.step,
            "loss": float(task_value) + float(sparsity_loss.detach()),
            "task_loss": float(task_value),
            "loss_name": config.loss,
            "sparsity_loss": float(sparsity_loss.detach()),
            "expected_sparsity": float(sparsity.detach()),
            "node_sparsity": None if node_sparsity is None else float(node_sparsity.detach()),
            "target": target,
            "lambdas": {n: float(v) for n, v in zip(names, self.lambdas.detach().cpu())},
        }

    def save(self) -> bytes:
        extra = {
            "config": dataclasses.asdict(self.config),
            "history": self.history,
            "start_sparsity": self.start_sparsity,
            "dataset_hash": self.dataset.content_hash,
        }
        return to_bytes(TrainingState(self.step, self.params(), self.optimizer.state_dict(), extra))

    def load(self, data: bytes) -> None:
        state = from_bytes(data)
        saved = state.extra.get("config", {})
        mine = dataclasses.asdict(self.config)
        changed = sorted(k for k in mine if k not in _RESULT_NEUTRAL and saved.get(k) != mine[k])
        if changed:
            raise InvalidArgument(
                f"the checkpoint was made with other settings ({', '.join(changed)})", field="resume"
            )
        if state.extra.get("dataset_hash") != self.dataset.content_hash:
            raise InvalidArgument("the checkpoint was made on another dataset", field="resume")
        params = self.params()
        if set(state.params) != set(params):
            raise InvalidArgument("the checkpoint's masks do not match this run", field="resume")
        with torch.no_grad():
            for name, tensor in params.items():
                if state.params[name].shape != tensor.shape:
                    raise InvalidArgument(
                        f"the checkpoint's {name} has shape {list(state.params[name].shape)}, this "
                        f"model needs {list(tensor.shape)}", field="resume",
                    )
                tensor.copy_(state.params[name])
        self.optimizer.load_state_dict(state.optimizer)
        self.step = state.step
        self.history = list(state.extra["history"])
        self.start_sparsity = float(state.extra["start_sparsity"])


# Settings that change how a run computes, not what: a run may resume with other values.
_RESULT_NEUTRAL = frozenset({"distributed", "activation_checkpointing"})


def _lagrangian(
    lambda1: torch.Tensor, lambda2: torch.Tensor, target: float, sparsity: torch.Tensor
) -> torch.Tensor:
    """``lambda1 (t - s) + lambda2 (t - s)^2``: a scalar."""
    gap = target - sparsity
    return lambda1 * gap + lambda2 * gap**2


def _world(config: PruneConfig) -> tuple[int, int]:
    """(rank, world size): (0, 1) unless ``distributed`` and torch.distributed is initialised."""
    if config.distributed and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def prune(
    model: CircuitModel,
    dataset: TaskDataset,
    config: PruneConfig | None = None,
    *,
    progress: Callable[[ProgressEvent | PhaseProgress], None] | None = None,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[bytes], None] | None = None,
    resume: bytes | None = None,
    should_stop: Callable[[], bool] | None = None,
    warm_scores: torch.Tensor | None = None,
) -> PruneResult:
    """Learn edge (and node) masks of ``model`` on ``dataset`` and cut a circuit from them.

    ``progress`` receives a :class:`PhaseProgress` after every pass of the preparation (activation
    cache, EAP-IG warm start) and a :class:`ProgressEvent` after every step;
    ``on_checkpoint(bytes)`` is called every ``checkpoint_every`` steps and when ``should_stop()``
    (polled before every step) ends the run early; ``resume`` continues from such bytes (same
    model, dataset and config). ``should_stop()`` is polled during the preparation too, which has
    nothing to checkpoint yet: there it raises :class:`~edgeprune.engine.errors.Stopped`.
    ``warm_scores`` [E]: EAP-IG scores already computed on this dataset, reused by
    ``warm_start="eap_ig"``. With ``config.distributed`` and torch.distributed initialised, every
    rank takes its share of each batch and the gradients are averaged across ranks before each
    optimizer step. The result's ``warnings`` say where the circuit falls short of the request.
    """
    config = config or PruneConfig()
    config.validate(model, dataset)
    if checkpoint_every < 0:
        raise InvalidArgument("checkpoint_every must be >= 0", field="checkpoint_every")
    rank, world = _world(config)
    if config.batch_size < world:
        raise InvalidArgument(f"batch_size {config.batch_size} is smaller than the {world} ranks",
                              field="batch_size")
    graph = model.graph
    run = _Run(model, dataset, config)

    def phase(name: str) -> Callable[[int, int], None] | None:
        if progress is None:
            return None
        return lambda done, total: progress(PhaseProgress(name, done, total))

    cache = ActivationCache(model, dataset, ablation=config.ablation, budget_bytes=config.cache_bytes,
                            progress=phase("cache"), should_stop=should_stop)
    if resume is not None:
        run.load(resume)
    else:
        if config.warm_start == "eap_ig":
            _warm_start(run, cache, warm_scores, progress=phase("warm_start"),
                        should_stop=should_stop)
        with torch.no_grad():
            run.start_sparsity = float(run.expected_sparsity()[0])
    final_target = config.final_edge_target(graph)
    stopped = False
    tick = time.perf_counter()
    while run.step < config.steps:
        if should_stop is not None and should_stop():
            stopped = True
            if on_checkpoint is not None:
                on_checkpoint(run.save())
            break
        entry = run.train_step(cache, final_target, rank=rank, world=world)
        now = time.perf_counter()
        run.history.append(entry)
        if progress is not None:
            progress(ProgressEvent(total_steps=config.steps, steps_per_s=1.0 / max(now - tick, 1e-9),
                                   **entry))
        tick = now
        if checkpoint_every and on_checkpoint is not None and run.step % checkpoint_every == 0:
            on_checkpoint(run.save())

    return _result(model, dataset, run, stopped, cache, should_stop=should_stop,
                   on_checkpoint=on_checkpoint)


def _warm_start(run: _Run, cache: ActivationCache, scores: torch.Tensor | None, *,
                progress: Callable[[int, int], None] | None,
                should_stop: Callable[[], bool] | None) -> None:
    """Start the edge log_alphas from EAP-IG scores (see ``masks.warm_log_alpha``)."""
    config, graph = run.config, run.model.graph
    if scores is None:
        # under the run's activation checkpointing, so the warm start's peak stays the step's
        with run.model.checkpointing(config.activation_checkpointing):
            scores = eap_ig_scores(cache, steps=config.warm_start_ig_steps,
                                   batch_size=config.batch_size, progress=progress,
                                   should_stop=should_stop)
    elif scores.shape != (graph.n_edges,):
        raise InvalidArgument(f"warm_scores must have shape [{graph.n_edges}]", field="warm_scores")
    keep = config.requested_edges(graph)
    if keep is None:
        keep = max(1, round((1.0 - min(config.final_edge_target(graph), 1.0)) * graph.n_edges))
    with torch.no_grad():
        run.edge_la.copy_(masks.warm_log_alpha(scores, keep, high=config.warm_start_scale,
                                               floor=config.warm_start_floor))
    if _world(config)[1] > 1:  # every rank starts from rank 0's masks, to the last bit
        dist.broadcast(run.edge_la.data, src=0)
    run.warm_scores = scores.detach().float().cpu()


@torch.no_grad()
def smallest_faithful(
    cache: ActivationCache, scores: torch.Tensor, loss: str, tolerance: float, *, batch_size: int = 32
) -> torch.Tensor:
    """The live edges of the fewest top-scored edges whose mean ``loss`` is <= ``tolerance``: [E].

    Bisection on the number of top edges, assuming the loss falls as edges are added.
    """
    graph, model = cache.model.graph, cache.model
    n = len(cache.dataset)

    def keep(m: int) -> torch.Tensor:
        return live_edges(graph, top_edges(graph, scores, m))  # [E]

    def loss_of(m: int) -> float:
        mask = keep(m).to(model.device, model.dtype)  # [E]
        total = 0.0
        for index in torch.arange(n).split(batch_size):
            batch = cache.batch(index)
            total += float(objective.loss(loss, batch, cache.logits(batch, mask, None))) * len(index) / n
        return total

    lo, hi = 0, graph.n_edges  # the full graph reproduces the model: loss(hi) == 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if loss_of(mid) <= tolerance:
            hi = mid
        else:
            lo = mid
    return keep(hi)


def _result(
    model: CircuitModel, dataset: TaskDataset, run: _Run, stopped: bool, cache: ActivationCache, *,
    should_stop: Callable[[], bool] | None, on_checkpoint: Callable[[bytes], None] | None,
) -> PruneResult:
    config, graph = run.config, model.graph
    node_la = None if run.node_la is None else run.node_la.detach().clone()
    scores = edge_scores(run.edge_la, node_la, graph.edge_writer)  # [E]
    settings = dataclasses.asdict(config)
    provenance = {"dataset": dataset.name, "split": dataset.split, "dataset_hash": dataset.content_hash,
                  "examples": len(dataset), "seed": config.seed, "steps_done": run.step}
    k = config.requested_edges(graph)
    if k is not None:
        target = size_target(config.edge_count, config.edge_sparsity)
        keep = select_top(graph, scores, k)  # [E]
    elif config.kl_tolerance is not None:
        target = {"kl_tolerance": config.kl_tolerance}
        keep = smallest_faithful(cache, scores, config.loss, config.kl_tolerance,
                                 batch_size=config.batch_size)
        if not stopped:  # the cut follows the ranking; make it minimal (a stopped run ends now)
            refined = minimal_circuit(cache, keep, scores, config.loss, config.kl_tolerance,
                                      batch_size=config.batch_size, should_stop=should_stop)
            log.info("minimal circuit: %d of %d edges (%d forward passes)",
                     int(refined.keep.sum()), int(keep.sum()), refined.forwards)
            keep = refined.keep
            if refined.stopped:  # the final state resumes into the same pass
                stopped = True
                if on_checkpoint is not None:
                    on_checkpoint(run.save())
    else:
        target = {"expected": True}
        with torch.no_grad():
            expected = round((1.0 - float(run.expected_sparsity()[0])) * graph.n_edges)
        keep = select_top(graph, scores, expected)
    circuit = circuit_from_keep(graph, keep, scores, model=model.name, method="edge_pruning",
                                target=target, settings=settings, provenance=provenance)
    with torch.no_grad():
        reached = float(run.expected_sparsity()[0])
    final_target = config.final_edge_target(graph)
    warnings = [] if stopped or k is None else [  # without a size the masks set it
        *diagnostics.training_warnings(reached, final_target),
        *diagnostics.size_warnings(circuit.edge_count, k),
    ]
    for warning in warnings:
        log.warning("edge pruning: %s", warning.message)
    return PruneResult(
        warm_scores=run.warm_scores,
        reached_sparsity=reached,
        target_sparsity=final_target,
        warnings=warnings,
        edge_log_alpha=run.edge_la.detach().clone(),
        node_log_alpha=node_la,
        circuit=circuit,
        history=run.history,
        steps_done=run.step,
        stopped=stopped,
        config=config,
        edge_writer=graph.edge_writer,
    )
