"""What the methods optimise or differentiate, on one cached batch.

Edge Pruning minimises a *loss* between the full model and the circuit: "kl" (KL(full || circuit)
at the answer positions), "logit_diff" (mean |task metric of the circuit - of the full model|,
the task metric being the dataset's logit or probability difference) or "mse" (mean squared
difference of the logits, for models with a numerical output such as Tracr's xproportion, where a
one-logit softmax carries nothing). The attribution baselines
differentiate a *metric*: the task metric, "kl", or "target" (the log-probability of the full
model's answer, for tasks without distractors: KL itself has zero gradient at the full model).
"""

from __future__ import annotations

import torch

from edgeprune.engine import metrics
from edgeprune.engine.cache import Batch
from edgeprune.engine.errors import InvalidArgument
from edgeprune.engine.tasks import TaskDataset

LOSSES = ("kl", "logit_diff", "mse")
ATTRIBUTION_METRICS = ("logit_diff", "prob_diff", "kl", "target")


def has_task_metric(dataset: TaskDataset) -> bool:
    """Whether the dataset defines its logit- or probability-difference metric."""
    return dataset.has_answer_sets if dataset.metric == "prob_diff" else dataset.has_distractors


def check_loss(name: str, dataset: TaskDataset) -> str:
    """``name`` if it is a loss this dataset supports, else InvalidArgument."""
    if name not in LOSSES:
        raise InvalidArgument(f"loss must be one of {', '.join(LOSSES)}, not {name!r}", field="loss")
    if name == "logit_diff" and not has_task_metric(dataset):
        raise InvalidArgument(
            f"loss 'logit_diff' needs distractors (or good/bad sets); dataset {dataset.name!r} has "
            "none: use 'kl'",
            field="loss",
        )
    return name


def loss(name: str, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
    """The pruning loss of the circuit's ``logits`` [B, P, V] on ``batch``: a scalar."""
    if name == "kl":
        return metrics.kl_divergence(batch.clean_logits, logits, batch.data.answer_mask)
    if name == "mse":
        valid = batch.data.answer_mask.to(logits.device, logits.dtype)  # [B, P]
        error = (logits.float() - batch.clean_logits.float()).pow(2).mean(-1)  # [B, P]
        return (error * valid).sum() / valid.sum().clamp(min=1)
    full = metrics.task_metric(batch.clean_logits, batch.data)  # [B]
    return (metrics.task_metric(logits, batch.data) - full).abs().mean()


def default_metric(dataset: TaskDataset) -> str:
    """The dataset's own metric where it has one, else "target"."""
    return dataset.metric if has_task_metric(dataset) else "target"


def check_metric(name: str | None, dataset: TaskDataset) -> str:
    """A valid attribution metric for ``dataset`` (None -> ``default_metric``)."""
    if name is None:
        return default_metric(dataset)
    if name not in ATTRIBUTION_METRICS:
        raise InvalidArgument(
            f"metric must be one of {', '.join(ATTRIBUTION_METRICS)}, not {name!r}", field="metric"
        )
    if name in ("logit_diff", "prob_diff") and (name != dataset.metric or not has_task_metric(dataset)):
        raise InvalidArgument(
            f"dataset {dataset.name!r} does not define the {name!r} metric", field="metric"
        )
    return name


def metric(name: str, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
    """The attribution metric of ``logits`` [B, P, V] on ``batch``: a scalar (mean over rows)."""
    if name in ("logit_diff", "prob_diff"):
        return metrics.task_metric(logits, batch.data).mean()
    if name == "kl":
        return metrics.kl_divergence(batch.clean_logits, logits, batch.data.answer_mask)
    answer = batch.clean_logits.argmax(-1, keepdim=True)  # [B, P, 1]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, answer)[..., 0]  # [B, P]
    valid = batch.data.answer_mask.to(logp.device, logp.dtype)  # [B, P]
    return (logp * valid).sum() / valid.sum().clamp(min=1)
