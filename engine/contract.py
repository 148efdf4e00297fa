"""What the engine accepts, importable without torch: the names of its methods and options, its
built-in tasks, and the largest values it takes.

A service checks requests against this module (and fills unset fields from
``edgeprune.engine.defaults``) before any worker sees them, so whatever passes its checks the
engine can run. A service may be stricter than a limit here, never looser.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeprune.engine import defaults
from edgeprune.engine.examples import MAX_ANSWER_SET, MAX_EXAMPLES, MAX_TOKENS_PER_EXAMPLE
from edgeprune.engine.task_params import Param

# ---- names -------------------------------------------------------------------------------------

# "eap_ig" integrates over the input embeddings (as MIB's EAP-IG), "eap_ig_edges" over the masks.
METHODS = ("edge_pruning", "eap", "eap_ig", "acdc", "eap_ig_edges")
IG_METHODS = ("eap_ig", "eap_ig_edges")  # the methods that take ig_steps
ABLATIONS = ("corrupted", "zero", "mean")
LOSSES = ("kl", "logit_diff")
DTYPES = ("float32", "bfloat16", "float16")
WARM_STARTS = ("eap_ig",)  # or None: every mask starts on

# ---- built-in tasks ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskInfo:
    """A built-in task as the API knows it: its metric, a lower bound of its prompts' token
    count, what it is, and the parameters its generator takes."""

    metric: str
    min_tokens: int
    description: str
    params: tuple[Param, ...] = ()


# min_tokens: fewest tokens of the longest prompt each task generates, whatever its parameters
# (words of its shortest template): a bound of the sequence length the API can use without a
# tokenizer.
BUILTIN = {
    "ioi": TaskInfo(
        "logit_diff", 12,
        "Indirect object identification with the ABC corruption (Wang et al. 2023)",
    ),
    "gendered_pronoun": TaskInfo(
        "logit_diff", 5, 'Gendered pronoun: " he" or " she" after a name (Mathwin et al. 2023)',
    ),
    "greater_than": TaskInfo(
        "prob_diff", 10, "Greater-than on years, probability difference (Hanna et al. 2023)",
    ),
    "mcqa": TaskInfo(
        "logit_diff", 10,
        "Multiple-choice colour questions, the answer's letter; corrupted: the options permuted "
        "(MIB's MCQA)",
        (Param("n_choices", "int", 4, "options per question", minimum=2, maximum=4),),
    ),
    "arithmetic": TaskInfo(
        "logit_diff", 4,
        'Addition or subtraction, "a + b =" -> the result; corrupted: other operands (MIB\'s '
        "arithmetic)",
        (
            Param("operation", "choice", "add", "add (a + b) or sub (a - b, a >= b)",
                  choices=("add", "sub")),
            Param("max_operand", "int", 99, "operands are drawn from [0, max_operand]",
                  minimum=9, maximum=9999),
            Param("multi_token", "bool", True,
                  "score every token of the result (teacher-forced); false: its first token"),
        ),
    ),
}
TASK_MIN_TOKENS = {name: task.min_tokens for name, task in BUILTIN.items()}
BUILTIN_TASKS = tuple(BUILTIN)
TRACR_TASK_PREFIX = "tracr_"  # "tracr_<program>": the task of a compiled Tracr model
TRACR_MIN_TOKENS = 2  # BOS and one input token

# ---- limits ------------------------------------------------------------------------------------

MAX_SEED = defaults.MAX_SEED  # larger seeds overflow the torch seeds derived from them
MAX_IG_STEPS = 1000  # forward and backward passes per batch grow with it
MAX_LEARNING_RATE = 100.0
MAX_ACDC_THRESHOLD = 1e6
MAX_EDGE_SPARSITY = 1.2  # Edge Pruning's target may overshoot 1 (runs settle slightly below it)
MAX_EVAL_FRACTION = 0.9  # at least a tenth of the examples stays to train on
MAX_DRAWING_EDGES = 5000  # edges in one drawing (top_k): beyond this no drawing is readable
MAX_DRAWING_NODES = 64  # names in a drawing's node filter

# Every limit by name: a service's limit of the same name must not exceed it.
LIMITS = {
    "max_examples": MAX_EXAMPLES,
    "max_tokens_per_example": MAX_TOKENS_PER_EXAMPLE,
    "max_answer_set": MAX_ANSWER_SET,
    "max_seed": MAX_SEED,
    "max_ig_steps": MAX_IG_STEPS,
    "max_learning_rate": MAX_LEARNING_RATE,
    "max_acdc_threshold": MAX_ACDC_THRESHOLD,
    "max_edge_sparsity": MAX_EDGE_SPARSITY,
    "max_eval_fraction": MAX_EVAL_FRACTION,
}
