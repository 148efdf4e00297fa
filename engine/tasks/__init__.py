"""Task datasets: examples, tokenised datasets, the built-in generators and JSONL custom datasets.

Built-in tasks (:data:`TASKS`, built with :func:`build_task`): "ioi", "gendered_pronoun",
"greater_than", and "tracr_<program>" for compiled Tracr programs. Custom datasets:
:func:`from_examples`, :func:`load_jsonl`. The size limits (``MAX_*``) are exported so a service
can report them.
"""

from edgeprune.engine.examples import MAX_ANSWER_SET, MAX_EXAMPLES, MAX_TOKENS_PER_EXAMPLE, Example
from edgeprune.engine.tasks.base import SPLITS, TaskDataset, from_examples
from edgeprune.engine.tasks.gendered_pronoun import gendered_pronoun_examples
from edgeprune.engine.tasks.greater_than import greater_than_examples
from edgeprune.engine.tasks.ioi import ioi_examples
from edgeprune.engine.tasks.jsonl import MAX_JSONL_BYTES, load_jsonl, parse_jsonl
from edgeprune.engine.tasks.registry import TASKS, TRACR_TASK, TaskSpec, build_task, register

register(
    TaskSpec(
        name="ioi",
        metric="logit_diff",
        generate=ioi_examples,
        description="Indirect object identification with the ABC corruption (Wang et al. 2023)",
    )
)
register(
    TaskSpec(
        name="gendered_pronoun",
        metric="logit_diff",
        generate=gendered_pronoun_examples,
        description='Gendered pronoun: " he" or " she" after a name (Mathwin et al. 2023)',
    )
)
register(
    TaskSpec(
        name="greater_than",
        metric="prob_diff",
        generate=greater_than_examples,
        description="Greater-than on years, probability difference (Hanna et al. 2023)",
    )
)

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
