"""Task datasets: examples, tokenised datasets, the built-in generators and JSONL custom datasets.

Built-in tasks (:data:`TASKS`, built with :func:`build_task`): "ioi", "gendered_pronoun",
"greater_than", "mcqa", "arithmetic", and "tracr_<program>" for compiled Tracr programs. Custom datasets:
:func:`from_examples`, :func:`load_jsonl`. The size limits (``MAX_*``) are exported so a service
can report them.
"""

from collections.abc import Callable

from edgeprune.engine.contract import BUILTIN
from edgeprune.engine.examples import MAX_ANSWER_SET, MAX_EXAMPLES, MAX_TOKENS_PER_EXAMPLE, Example
from edgeprune.engine.tasks.arithmetic import arithmetic_examples
from edgeprune.engine.tasks.base import SPLITS, TaskDataset, from_examples
from edgeprune.engine.tasks.gendered_pronoun import gendered_pronoun_examples
from edgeprune.engine.tasks.greater_than import greater_than_examples
from edgeprune.engine.tasks.ioi import ioi_examples
from edgeprune.engine.tasks.jsonl import MAX_JSONL_BYTES, load_jsonl, parse_jsonl
from edgeprune.engine.tasks.mcqa import mcqa_examples
from edgeprune.engine.tasks.registry import TASKS, TRACR_TASK, TaskSpec, build_task, register


def _builtin(name: str, generate: Callable[..., list[Example]]) -> TaskSpec:
    """Register the built-in task ``name`` with its metric, description and parameters from the
    torch-free contract (which the service checks requests against)."""
    info = BUILTIN[name]
    return register(
        TaskSpec(
            name=name,
            metric=info.metric,  # type: ignore[arg-type]
            description=info.description,
            generate=generate,
            params=info.params,
        )
    )


_builtin("ioi", ioi_examples)
_builtin("gendered_pronoun", gendered_pronoun_examples)
_builtin("greater_than", greater_than_examples)
_builtin("mcqa", mcqa_examples)
_builtin("arithmetic", arithmetic_examples)

__all__ = [
    "MAX_ANSWER_SET",
    "MAX_EXAMPLES",
    "MAX_JSONL_BYTES",
    "MAX_TOKENS_PER_EXAMPLE",
    "SPLITS",
    "TASKS",
    "TRACR_TASK",
    "Example",
    "TaskDataset",
    "TaskSpec",
    "build_task",
    "from_examples",
    "load_jsonl",
    "parse_jsonl",
    "register",
]
