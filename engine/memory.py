"""How much memory a pruning job needs, from the model config alone.

The server calls :func:`estimate_job_memory` before it accepts a job and rejects one that cannot
fit its device (:func:`check_fits` raises ``ResourceExhausted`` with the estimate; the estimate is
plain arithmetic and this module imports torch only inside :func:`device_memory` and
:func:`track_peak_memory`, so the API process uses it without loading torch). The estimate
follows what the masked forward + backward of one pruning step keeps alive at its peak (the start
of the backward pass), term by term:

* ``weights``      the frozen model, P parameters in the job's dtype;
* ``ablated``      the ablation values y~ [W, B, T, D] of the batch, and the run's cache of the
                   corrupted activations [W, N, T, D] where it fits its budget;
* ``deltas``       the writer-delta buffer d [W, B, T, D] and ``delta_grads`` its gradient;
* ``activations``  what autograd saves per layer: every reader's input to its norm
                   [H + 2KV + 1, B, T, D], q/k/v and the attention output [B, H|KV, T, K], and the
                   MLP's hidden activations [B, T, F] (Gemma-2 also its soft-capped scores
                   [B, H, T, T] and the heads' outputs [H, B, T, D] its post-attention norm
                   scales); with activation checkpointing the
                   checkpointed regions (a layer's attention and its MLP) keep only their
                   inputs, the reader inputs [H + 2KV + 1, B, T, D] in the model's dtype, for
                   every layer, and the recomputed rest for one layer at a time;
* ``masks``        log-alphas of every edge and node with their gradient, AdamW state and the
                   hard-concrete intermediates (fp32);
* ``logits``       logits at the answer positions only [B, P, V], clean and masked, with softmax
                   and gradient (fp32), and the cached full-model logits [N, P, V];
* ``workspace``    the transient gradients of one layer during the backward pass.

:func:`estimate_evaluation_memory` gives the same terms for an evaluation (``metrics.evaluate_many``,
an evaluation job): one batch's masked forwards without gradients.

The per-term copy counts (``_*_COPIES``) were calibrated on CPU against measured peaks of the real
masked forward + backward (bench/bench_memory.py; tests/engine/test_memory.py holds the
estimate within ``CALIBRATION_TOLERANCE`` of a measurement). On GPU the CUDA caching allocator adds
fragmentation, hence ``headroom`` in :func:`check_fits`.

Shapes: B batch, T tokens, W writers, E edges, L layers, H query heads, KV key/value heads,
K head width, D model width, F MLP width, V vocab, P answer positions per example.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import numbers
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeprune.engine.errors import InvalidArgument, ResourceExhausted

if TYPE_CHECKING:
    import torch

__all__ = [
    "CALIBRATION_TOLERANCE",
    "DEFAULT_BUDGET_BYTES",
    "PRESETS",
    "MemoryEstimate",
    "ModelShape",
    "PeakMemory",
    "check_fits",
    "device_memory",
    "estimate_evaluation_memory",
    "estimate_job_memory",
    "track_peak_memory",
]

GiB = 1024**3

# What a run may keep of per-example activations (engine/cache.py); defined here, where no torch
# is imported, so that the API server can estimate a job without loading torch.
DEFAULT_BUDGET_BYTES = 1 << 30

# The estimate stays within this relative error of a measured CPU peak (see the tests).
CALIBRATION_TOLERANCE = 0.25

# What autograd saves per layer, calibrated with saved-tensor hooks and peak measurements. The
# model's weights are frozen, so projections save nothing but their weight; what is saved is the
# input of every norm (in fp32 for RMSNorm, which upcasts), the attention's q, k, v and output
# (SDPA's fused kernels save no [T, T] scores), and the MLP's nonlinearity.
_NORM_INPUT_COPIES = 1.0  # every reader's input [H + 2KV + 1, B, T, D], before its norm
_HEAD_COPIES = 1.0  # q, k, v and attention output [B, H|KV, T, K]
_SCORE_COPIES = 3.0  # soft-capped attention: tanh of the scores, probabilities (fp32 and dtype)
_GATED_HIDDEN_COPIES = 3.0  # gate, act(gate), up [B, T, F]
_PLAIN_HIDDEN_COPIES = 4.0  # the tanh-GELU's input, tanh, halves [B, T, F]
_BACKWARD_COPIES = 2.0  # one layer's input and hidden gradients alive during its backward
_LOGIT_COPIES = 6.0  # clean and masked logits, their log-softmaxes, KL terms, gradient [B, P, V]
# An EAP-IG warm start's passes run the masked model at full masks with gradients while holding
# the writers' clean-minus-ablated differences [W, B, T, D] and the gradient against them: its
# peak is above a step's by a few [W, B, T, D], with or without checkpointing (the constant is
# calibrated by `python -m bench memory`, which measures runs with and without a warm start).
_WARM_START_COPIES = 3.5
_MASK_BYTES_PER_ENTRY = 4 * 12  # fp32: log_alpha, grad, 2 AdamW moments, ~8 sampling temporaries
_EVAL_MASK_COPIES = 4  # an evaluation's dense masks: the circuit's, the empty one's, their weights

# dtype name (or alias) -> (canonical name, bytes per element); torch dtypes are named "torch.x".
_DTYPES = {
    "float32": ("float32", 4),
    "fp32": ("float32", 4),
    "bfloat16": ("bfloat16", 2),
    "bf16": ("bfloat16", 2),
    "float16": ("float16", 2),
    "fp16": ("float16", 2),
}


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a transformer that decide its pruning job's memory."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_ff: int
    vocab_size: int
    head_dim: int = 0  # 0: d_model // n_heads
    has_pos: bool = False  # learned position embedding (a "pos" writer)
    n_positions: int = 0  # rows of the position embedding
    tied_embeddings: bool = True
    gated_mlp: bool = True  # LLaMA-style gate/up/down; False: GPT-2 style fc/proj
    attn_bias: bool = False
    qk_norm: bool = False  # an RMSNorm [K] on every query and key head (Qwen3)
    # q_norm / k_norm over all heads together ([H*K], [KV*K]; OLMo-2): every query and key
    # reader's input is projected by every head, and kept with the norm's float32 copy
    joint_qk_norm: bool = False
    # the attention output normalised before the residual (OLMo-2): the heads' outputs
    # [H, B, T, D] that the norm scales are kept
    post_attention_norm: bool = False
    norm_weights: bool = True  # False: norms without parameters (OLMo's LayerNorm)
    post_norms: bool = False  # norms after attention and after the MLP too (Gemma-2)
    attn_softcap: bool = False  # soft-capped attention logits: scores [B, H, T, T] are formed
    parallel_attn_mlp: bool = False  # MLP l reads the layer's input, not its heads (GPT-NeoX)
    name: str = ""

    def __post_init__(self) -> None:
        for name in ("n_layers", "n_heads", "n_kv_heads", "d_model", "d_ff", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise InvalidArgument(
                    f"{name} must be a positive integer, got {value!r}", field=name
                )
        if self.n_heads % self.n_kv_heads:
            raise InvalidArgument(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})",
                field="n_kv_heads",
            )
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)

    # ---- counts --------------------------------------------------------------------------------

    @property
    def n_writers(self) -> int:
        """tok, [pos], and per layer H heads + 1 MLP."""
        return 1 + int(self.has_pos) + self.n_layers * (self.n_heads + 1)

    @property
    def n_edges(self) -> int:
        """Edges of the graph, counted without building their names."""
        H, KV, L = self.n_heads, self.n_kv_heads, self.n_layers
        embed = 1 + int(self.has_pos)
        upstream = [embed + layer * (H + 1) for layer in range(L)]  # writers before layer l
        attn = sum((H + 2 * KV) * n for n in upstream)
        mlp = sum(upstream) if self.parallel_attn_mlp else sum(n + H for n in upstream)
        return attn + mlp + self.n_writers

    @property
    def n_params(self) -> int:
        """Parameters of the model (embeddings, attention, MLP, norms)."""
        D, F, K = self.d_model, self.d_ff, self.head_dim
        H, KV = self.n_heads, self.n_kv_heads
        attn = D * K * (H + 2 * KV) + H * K * D
        if self.attn_bias:
            attn += K * (H + 2 * KV) + D
        if self.qk_norm:
            attn += 2 * K
        if self.joint_qk_norm:
            attn += (H + KV) * K
        mlp = 3 * D * F if self.gated_mlp else 2 * D * F + F + D
        norm = D if self.gated_mlp else 2 * D  # RMSNorm (LLaMA family) or LayerNorm with bias
        norm *= self.norm_weights
        embed = self.vocab_size * D * (1 if self.tied_embeddings else 2) + self.n_positions * D
        norms = 4 if self.post_norms else 2  # per layer
        return embed + self.n_layers * (attn + mlp + norms * norm) + norm

    # ---- constructors --------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Any, *, name: str = "") -> ModelShape:
        """From a Hugging Face config (object or config.json dict) or a Tracr config, by the
        reader registered for its ``model_type`` in ``SHAPE_READERS``."""
        get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
        model_type = get("model_type")
        if model_type is None and get("num_layers") is not None and get("mlp_hidden_size") is not None:
            model_type = "tracr"  # a TracrConfig has no model_type
        reader = SHAPE_READERS.get(model_type)
        if reader is None:
            raise InvalidArgument(
                f"no memory model for model_type {model_type!r} ({', '.join(sorted(SHAPE_READERS))})",
                field="model",
            )
        return reader(get, name or str(model_type))

    @classmethod
    def from_model(cls, model: Any) -> ModelShape:
        """From a loaded ``CircuitModel`` (its module's config)."""
        module = model.module
        config = getattr(module, "config", None)
        if config is None:
            raise InvalidArgument("the model has no config to estimate from", field="model")
        return cls.from_config(config, name=getattr(model, "name", ""))

    @classmethod
    def from_config_file(cls, path: str | Path, *, name: str = "") -> ModelShape:
        """From a checkpoint folder's config.json (no weights are read)."""
        import json

        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        try:
            config = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise InvalidArgument(f"cannot read model config {file}: {exc}", field="model") from exc
        return cls.from_config(config, name=name or file.parent.name)


# Published configs of the models in docs/memory.md's table (no download needed).
PRESETS: dict[str, ModelShape] = {
    "gpt2-small": ModelShape(12, 12, 12, 768, 3072, 50257, has_pos=True, n_positions=1024,
                             gated_mlp=False, attn_bias=True, name="gpt2-small"),
    "smollm2-135m": ModelShape(30, 9, 3, 576, 1536, 49152, name="smollm2-135m"),
    "llama-2-7b": ModelShape(32, 32, 32, 4096, 11008, 32000, tied_embeddings=False,
                             name="llama-2-7b"),
    "codellama-13b": ModelShape(40, 40, 40, 5120, 13824, 32016, tied_embeddings=False,
                                name="codellama-13b"),
}  # fmt: skip


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes of one pruning step, term by term (see the module docstring)."""

    weights: int
    ablated: int
    deltas: int
    delta_grads: int
    activations: int
    masks: int
    logits: int
    workspace: int
    warm_start: int = 0
    settings: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def total(self) -> int:
        return sum(v for k, v in asdict(self).items() if k != "settings")

    def terms(self) -> dict[str, int]:
        """Every term in bytes, plus ``total``."""
        out = {k: v for k, v in asdict(self).items() if k != "settings"}
        out["total"] = self.total
        return out

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.terms().items() if k != "total")
        return f"{self.total / GiB:.2f} GiB ({parts} GiB)"


# ---- per-family shape readers: config getter, name -> ModelShape ---------------------------------

ConfigGetter = Callable[..., Any]


def _gpt2_shape(get: ConfigGetter, name: str) -> ModelShape:
    d_model = get("n_embd")
    return ModelShape(
        n_layers=get("n_layer"),
        n_heads=get("n_head"),
        n_kv_heads=get("n_head"),
        d_model=d_model,
        d_ff=get("n_inner") or 4 * d_model,
        vocab_size=get("vocab_size"),
        has_pos=True,
        n_positions=get("n_positions", 1024),
        tied_embeddings=True,
        gated_mlp=False,
        attn_bias=True,
        name=name,
    )


def _llama_shape(
    get: ConfigGetter, name: str, *, tied: bool = False, **features: bool
) -> ModelShape:
    """LLaMA-layout families; ``tied`` is the family's default where a config.json leaves
    ``tie_word_embeddings`` out (Gemma's is True), ``features`` the ModelShape flags it has."""
    heads = get("num_attention_heads")
    return ModelShape(
        n_layers=get("num_hidden_layers"),
        n_heads=heads,
        n_kv_heads=get("num_key_value_heads") or heads,
        d_model=get("hidden_size"),
        d_ff=get("intermediate_size"),
        vocab_size=get("vocab_size"),
        head_dim=get("head_dim") or 0,
        tied_embeddings=bool(get("tie_word_embeddings", tied)),
        attn_bias=bool(get("attention_bias", get("model_type") == "qwen2")),
        name=name,
        **features,
    )


def _gemma2_shape(get: ConfigGetter, name: str) -> ModelShape:
    softcap = get("attn_logit_softcapping", 50.0) is not None  # Gemma2Config's default: 50
    return _llama_shape(get, name, tied=True, post_norms=True, attn_softcap=softcap)


def _gpt_neox_shape(get: ConfigGetter, name: str) -> ModelShape:
    heads = get("num_attention_heads")
    return ModelShape(
        n_layers=get("num_hidden_layers"),
        n_heads=heads,
        n_kv_heads=heads,
        d_model=get("hidden_size"),
        d_ff=get("intermediate_size"),
        vocab_size=get("vocab_size"),
        tied_embeddings=bool(get("tie_word_embeddings", False)),
        gated_mlp=False,
        attn_bias=bool(get("attention_bias", True)),
        parallel_attn_mlp=bool(get("use_parallel_residual", True)),
        name=name,
    )


def _tracr_shape(get: ConfigGetter, name: str) -> ModelShape:
    heads = get("num_heads")
    vocab = len(get("input_vocab") or ()) or 1
    return ModelShape(
        n_layers=get("num_layers"),
        n_heads=heads,
        n_kv_heads=heads,
        d_model=get("d_model"),
        d_ff=max(1, get("mlp_hidden_size")),
        vocab_size=max(vocab, len(get("output_vocab") or ()) or 1),
        head_dim=get("key_size"),
        has_pos=True,
        n_positions=get("max_seq_len", 0),
        tied_embeddings=False,
        gated_mlp=False,
        attn_bias=True,
        name=name,
    )


# Keys are the adapters' registry keys (Hugging Face ``model_type``, and "tracr"); torch-free, so the
# API can estimate a job without importing a model family's code.
SHAPE_READERS: dict[str, Callable[[ConfigGetter, str], ModelShape]] = {
    "gpt2": _gpt2_shape,
    "llama": _llama_shape,
    "qwen2": _llama_shape,
    "mistral": _llama_shape,
    "qwen3": functools.partial(_llama_shape, qk_norm=True),
    "phi3": _llama_shape,  # fused q/k/v and gate/up projections: the same parameters
    "olmo": functools.partial(_llama_shape, norm_weights=False),
    "olmo2": functools.partial(_llama_shape, joint_qk_norm=True, post_attention_norm=True),
    "gemma": functools.partial(_llama_shape, tied=True),
    "gemma2": _gemma2_shape,
    "gpt_neox": _gpt_neox_shape,
    "tracr": _tracr_shape,
}


def _dtype(dtype: str | torch.dtype) -> tuple[str, int]:
    """(canonical name, bytes per element) of a dtype name or a torch dtype."""
    try:
        return _DTYPES[str(dtype).removeprefix("torch.").lower()]
    except KeyError:
        raise InvalidArgument(
            f"unknown dtype {dtype!r}; expected one of {sorted(set(_DTYPES))}", field="dtype"
        ) from None


def estimate_job_memory(
    model: ModelShape | Mapping[str, Any] | Any,
    *,
    batch_size: int,
    seq_len: int,
    dtype: str | torch.dtype = "float32",
    activation_checkpointing: bool = False,
    answer_positions: int = 1,
    n_examples: int = 0,
    cache_bytes: int = DEFAULT_BUDGET_BYTES,
    world_size: int = 1,
    warm_start: bool = False,
) -> MemoryEstimate:
    """Peak memory of one pruning step on one device (one rank of a data-parallel job).

    With ``warm_start`` the run starts with EAP-IG over the input embeddings, whose passes hold
    the batch's clean writer outputs' difference from the ablation values and its gradient
    besides a step's buffers: the ``warm_start`` term is what that adds to the peak.

    ``model`` is a :class:`ModelShape`, a Hugging Face config (object or config.json dict) or a
    loaded ``CircuitModel``. ``batch_size`` is the job's whole batch; with ``world_size`` ranks each
    holds ``ceil(batch_size / world_size)`` examples. ``n_examples`` is the dataset's size: the
    run caches the full model's logits of every example, and their corrupted activations
    [W, N, T, D] too when they fit in ``cache_bytes`` (see ``engine/cache.py``).
    """
    shape = _shape(model)
    _check_sizes(batch_size=batch_size, seq_len=seq_len, world_size=world_size,
                 answer_positions=answer_positions, n_examples=n_examples)
    dtype_name, s = _dtype(dtype)  # s: bytes per element of activations and weights
    B = -(-batch_size // world_size)  # this rank's share of the batch
    T, D, F, K = seq_len, shape.d_model, shape.d_ff, shape.head_dim
    H, KV, L, W = shape.n_heads, shape.n_kv_heads, shape.n_layers, shape.n_writers
    tokens = B * T

    per_writer = tokens * D * s  # one writer's [B, T, D]
    norm_bytes = 4 if shape.gated_mlp else s  # RMSNorm (LLaMA family) saves an fp32 upcast
    readers = (H + 2 * KV + 1) * tokens * D * norm_bytes  # every reader's input of one layer
    heads = tokens * K * (2 * H + 2 * KV) * s  # q, out [B, H, T, K]; k, v [B, KV, T, K]
    hidden = tokens * F * s  # one [B, T, F]
    hidden_copies = _GATED_HIDDEN_COPIES if shape.gated_mlp else _PLAIN_HIDDEN_COPIES
    layer = _NORM_INPUT_COPIES * readers + _HEAD_COPIES * heads + hidden_copies * hidden
    layer += _norm_extras(shape, tokens, s)
    layer += _attention_extras(shape, B, T, s)
    if activation_checkpointing:
        # torch.utils.checkpoint keeps every layer's region inputs (the readers' inputs in the
        # model's dtype) until the backward pass; the rest exists while one layer is recomputed
        activations = L * (H + 2 * KV + 1) * tokens * D * s + layer
    else:
        activations = L * layer
    corrupted_cache, clean_logits = _cached(shape, n_examples, T, answer_positions, s, cache_bytes)
    return MemoryEstimate(
        weights=shape.n_params * s,
        ablated=W * per_writer + corrupted_cache,
        deltas=W * per_writer,
        delta_grads=W * per_writer,
        activations=int(activations),
        masks=(shape.n_edges + W) * _MASK_BYTES_PER_ENTRY,
        logits=int(_LOGIT_COPIES * B * answer_positions * shape.vocab_size * 4) + clean_logits,
        workspace=int(_BACKWARD_COPIES * (readers + hidden)),
        warm_start=int(_WARM_START_COPIES * W * per_writer) if warm_start else 0,
        settings={
            "model": shape.name,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "dtype": dtype_name,
            "activation_checkpointing": activation_checkpointing,
            "answer_positions": answer_positions,
            "n_examples": n_examples,
            "world_size": world_size,
            "warm_start": warm_start,
        },
    )


def estimate_evaluation_memory(
    model: ModelShape | Mapping[str, Any] | Any,
    *,
    batch_size: int,
    seq_len: int,
    dtype: str | torch.dtype = "float32",
    answer_positions: int = 1,
    n_examples: int = 0,
    cache_bytes: int = DEFAULT_BUDGET_BYTES,
) -> MemoryEstimate:
    """Peak memory of evaluating circuits (``metrics.evaluate_many``, an evaluation job): masked
    forwards of one batch at a time, without gradients.

    Per batch it holds the ablation values y~ [W, B, T, D] and the delta buffer d [W, B, T, D],
    the reader inputs of one mixing block of layers (``activations``), one layer's transient
    heads and MLP activations (``workspace``), and the logits at the answer positions; the run
    caches what :func:`estimate_job_memory`'s run caches (clean logits, corrupted activations
    within ``cache_bytes``). Arguments as there; ``n_examples`` is the evaluated dataset's size.
    """
    shape = _shape(model)
    _check_sizes(batch_size=batch_size, seq_len=seq_len, world_size=1,
                 answer_positions=answer_positions, n_examples=n_examples)
    dtype_name, s = _dtype(dtype)
    B = min(batch_size, n_examples) if n_examples else batch_size
    T, D, F, K = seq_len, shape.d_model, shape.d_ff, shape.head_dim
    H, KV, W = shape.n_heads, shape.n_kv_heads, shape.n_writers
    tokens = B * T
    per_writer = tokens * D * s  # one writer's [B, T, D]
    # the masked forward's mixing block: the readers of round(sqrt(L)) layers (as
    # masked.block_layers), and the few spare rows a block keeps
    block = max(1, round(math.sqrt(shape.n_layers))) * (H + 2 * KV + 1) + 7
    heads = tokens * K * (2 * H + 2 * KV) * s  # q, out [B, H, T, K]; k, v [B, KV, T, K]
    heads += _attention_extras(shape, B, T, s)
    heads += _norm_extras(shape, tokens, s)
    hidden = tokens * F * s * (_GATED_HIDDEN_COPIES if shape.gated_mlp else _PLAIN_HIDDEN_COPIES)
    corrupted_cache, clean_logits = _cached(shape, n_examples, T, answer_positions, s, cache_bytes)
    return MemoryEstimate(
        weights=shape.n_params * s,
        ablated=W * per_writer + corrupted_cache,
        deltas=W * per_writer,
        delta_grads=0,
        activations=block * per_writer,
        masks=(shape.n_edges + W) * 4 * _EVAL_MASK_COPIES,
        logits=int(_LOGIT_COPIES * B * answer_positions * shape.vocab_size * 4) + clean_logits,
        workspace=int(heads + hidden),
        settings={
            "model": shape.name,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "dtype": dtype_name,
            "activation_checkpointing": False,
            "answer_positions": answer_positions,
            "n_examples": n_examples,
            "world_size": 1,
            "evaluation": True,
        },
    )


def _attention_extras(shape: ModelShape, B: int, T: int, s: int) -> int:
    """What one layer's attention keeps beyond q, k, v and its output, where the model has
    more than plain attention: soft-capped scores [B, H, T, T] (formed outside the fused
    kernel) and the heads' outputs [H, B, T, D] that a post-attention norm scales."""
    extra = 0.0
    if shape.attn_softcap:
        extra += _SCORE_COPIES * B * shape.n_heads * T * T * s
    if shape.post_norms:
        extra += shape.n_heads * B * T * shape.d_model * s
    return int(extra)


def _norm_extras(shape: ModelShape, tokens: int, s: int) -> int:
    """What one layer keeps for OLMo-2's norms beyond a LLaMA layer (not calibrated by a
    measurement): every head's projection of each query and key reader's input, [H, B, T, H*K]
    and [KV, B, T, KV*K], in the model's dtype and as the norm's float32 copy; the heads' outputs
    [H, B, T, D] that the post-attention norm scales."""
    H, KV, K = shape.n_heads, shape.n_kv_heads, shape.head_dim
    extra = 0
    if shape.joint_qk_norm:
        extra += (H * H + KV * KV) * K * tokens * (s + 4)
    if shape.post_attention_norm:
        extra += H * tokens * shape.d_model * s
    return extra


def _check_sizes(*, batch_size: int, seq_len: int, world_size: int, answer_positions: int,
                 n_examples: int) -> None:
    for name, value in (
        ("batch_size", batch_size),
        ("seq_len", seq_len),
        ("world_size", world_size),
    ):
        if value < 1:
            raise InvalidArgument(f"{name} must be positive, got {value}", field=name)
    if answer_positions < 1 or answer_positions > seq_len:
        raise InvalidArgument(
            f"answer_positions must be in 1..{seq_len}, got {answer_positions}",
            field="answer_positions",
        )
    if n_examples < 0:
        raise InvalidArgument(f"n_examples must be >= 0, got {n_examples}", field="n_examples")


def _cached(shape: ModelShape, n_examples: int, seq_len: int, answer_positions: int,
            element_bytes: int, cache_bytes: int) -> tuple[int, int]:
    """Bytes of what a run caches for every example, as engine/cache.py fills its budget: the
    full model's logits at the answer positions [N, P, V] (fp32) first, then its corrupted
    activations [W, N, T, D] within what is left (0 when they do not fit and are recomputed per
    batch)."""
    logits = n_examples * answer_positions * shape.vocab_size * 4
    if logits > cache_bytes:
        return 0, 0  # both recomputed for every batch
    corrupted = n_examples * seq_len * shape.n_writers * shape.d_model * element_bytes
    if corrupted > cache_bytes - logits:
        corrupted = 0
    return corrupted, logits


def _shape(model: Any) -> ModelShape:
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, str):
        if model not in PRESETS:
            raise InvalidArgument(
                f"unknown model preset {model!r}: {sorted(PRESETS)}", field="model"
            )
        return PRESETS[model]
    if hasattr(model, "module") and hasattr(model, "graph"):  # a CircuitModel
        return ModelShape.from_model(model)
    return ModelShape.from_config(model)


def device_memory(device: str | torch.device) -> int | None:
    """Bytes a job may use on ``device``: the GPU's total memory, or None (CPU: not enforced)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).total_memory
    return None


def check_fits(estimate: MemoryEstimate, available: int | None, *, headroom: float = 0.9) -> None:
    """Raise ResourceExhausted when the estimate exceeds ``headroom`` x ``available`` bytes."""
    if available is None:
        return
    budget = int(available * headroom)
    if estimate.total > budget:
        settings = estimate.settings
        if settings.get("evaluation"):  # no gradients to checkpoint, one device
            hint = "; try a smaller batch or shorter sequences, or bf16"
        elif settings.get("activation_checkpointing"):
            hint = "; try a smaller batch or shorter sequences, bf16, or more GPUs"
        else:
            hint = "; try activation checkpointing, a smaller batch or shorter sequences, bf16, " \
                   "or more GPUs"
        raise ResourceExhausted(
            f"job needs about {estimate} but the device allows {budget / GiB:.2f} GiB{hint}"
        )


# ---- measuring peaks (calibration, metrics) --------------------------------------------------


@dataclass
class PeakMemory:
    """Filled in when a :func:`track_peak_memory` block ends: bytes at its start and at its peak."""

    start: int = 0
    peak: int = 0

    @property
    def increase(self) -> int:
        return self.peak - self.start


def _proc_status_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    found = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"/proc/self/status has no {key}")
    return int(found.group(1)) * 1024


@contextlib.contextmanager
def track_peak_memory(device: str | torch.device = "cpu") -> Iterator[PeakMemory]:
    """Measure the peak memory of a block: allocated CUDA memory, or the process's resident set.

    On CPU (Linux) the peak resident set size is reset through /proc/self/clear_refs and read from
    VmHWM; large tensors are only returned to the OS promptly when glibc's mmap threshold is fixed
    (run with ``MALLOC_MMAP_THRESHOLD_=65536``), so measure in a fresh process.
    """
    import torch

    device = torch.device(device)
    result = PeakMemory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        result.start = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result.peak = torch.cuda.max_memory_allocated(device)
        return
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    result.start = _proc_status_kib("VmRSS")
    yield result
    result.peak = _proc_status_kib("VmHWM")
