"""The default of every method option, importable without torch.

The engine's ``PruneConfig`` and the API server's request validation (which must not load torch)
fill in unset fields from here, and the attribution methods' signatures default to the same values,
so a job submitted without them runs exactly as a library call without them would (but for the
service's own job defaults at the end). The names and limits these values are
checked against are in ``edgeprune.engine.contract``.

The defaults are a recipe that reaches the requested circuit size without hand-tuning (measured
by ``python -m bench methods``, whose results page compares it with tuned and paper settings):
the edge masks start from EAP-IG scores with the top edges of the requested size on and the rest
deep enough off that the masks' expected sparsity starts near the target, and small learning
rates refine that start. The paper's own GPT-2 setting (every mask on, 3000 steps, all learning
rates 0.8) needs thousands of steps to get there: it is ``warm_start=None`` with the ``PAPER_*``
values.
"""

from __future__ import annotations

PAPER_STEPS = 3000
PAPER_LEARNING_RATE = 0.8  # log-alphas, node log-alphas and the Lagrangian's lambdas
PAPER_TARGET_WARMUP = 2500 / 3000  # fraction of the steps over which the sparsity target rises
PAPER_LR_WARMUP = 200 / 3000  # fraction of the steps over which learning rates rise

STEPS = 100
BATCH_SIZE = 32
# Adam moves every log_alpha by about +-lr a step: from the warm start's range of a few units a
# step of 0.05 refines the ranking around the cut without scrambling it.
MASK_LEARNING_RATE = 0.05
LAMBDA_LEARNING_RATE = 0.05
# None: the Lagrangian is multiplied by the square root of the number of masks. On the mean over
# tens of thousands of edges each mask feels 1/E of the sparsity pressure, and lambdas growing by
# about their learning rate a step would need thousands of steps to outweigh the task loss's
# gradient. Scaled by E the masks reach the target but the lambdas swing the sparsity by several
# points and the circuit is worse; sqrt(E) measured best between the two.
LAGRANGIAN_SCALE: float | None = None
# Fraction of the steps over which the sparsity target rises: the last third holds the target,
# so the masks reach it before the run ends (the paper's 5/6 left too few steps to catch up).
TARGET_WARMUP = 2 / 3
WARM_START = "eap_ig"
WARM_START_IG_STEPS = 5
WARM_START_SCALE = 3.0  # the top edges start with log_alpha in (0, 3]
# the others below 0, in score order without a bound (see masks.warm_log_alpha). Starting the
# masks at the requested density instead (a steeper map below the cut) measured worse: the
# edges just below the cut must be sampled on for the task loss to rank them.
WARM_START_FLOOR: float | None = None
# Each step's generator is seeded with seed * SEED_STRIDE + step (and each epoch's permutation
# with seed * SEED_STRIDE + epoch); torch takes seeds in [-2**63, 2**64 - 1], so seeds within
# +-MAX_SEED stay in range for runs of up to 2**40 steps or epochs.
SEED_STRIDE = 1_000_003
MAX_SEED = (2**63 - 2**40) // SEED_STRIDE
NODE_MASKS = True
NODE_TARGET = 0.5  # the node sparsity target when a node loss is asked for without one
LOSS = "kl"
ABLATION = "corrupted"

# Attribution methods (EAP-IG's integration steps, ACDC's KL threshold).
IG_STEPS = 5
ACDC_THRESHOLD = 0.01

# A job of the service, where a request leaves these unset (the server's `default_*` settings
# start from them; an operator may change those).
JOB_BATCH_SIZE = 16
JOB_EXAMPLES = 128  # examples generated of a built-in task
JOB_EDGE_SPARSITY = 0.95
EVAL_FRACTION = 0.2  # of uploaded or inline examples held out to evaluate the circuits


def dtype_for(device: str) -> str:
    """The weights' dtype when a job does not name one: bfloat16 halves a GPU's memory and
    runs on its tensor cores; CPUs lack fast bfloat16 matmuls, so float32 there."""
    return "bfloat16" if device.startswith("cuda") else "float32"


def target_warmup_steps(steps: int) -> int:
    """Steps over which the sparsity target rises when a run does not say."""
    return round(steps * TARGET_WARMUP)


def lr_warmup_steps(steps: int) -> int:
    """Steps over which the learning rates rise when a run does not say."""
    return round(steps * PAPER_LR_WARMUP)
