"""Tiny randomly initialised Hugging Face checkpoints for tests, built offline.

Every factory writes a complete checkpoint folder (config, safetensors weights, tokenizer) so that
``edgeprune.engine.load_model(f"hf:{folder}")`` loads it exactly as it would a real model. The tokenizer
is a byte-level BPE trained here on task-like text, so the task generators see what they see in a real
tokenizer: common first names, pronouns and two-digit numbers are single tokens with a leading space.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    OlmoConfig,
    OlmoForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from edgeprune.engine.tasks import mcqa

NAMES = [
    "Mary", "John", "Alice", "Bob", "Tom", "James", "Sarah", "Emma", "David", "Paul", "Anna",
    "Lisa", "Mark", "Laura", "Peter", "Kate", "Michael", "Susan", "Robert", "Linda",
]
PLACES = ["store", "park", "school", "garden", "station", "office", "market", "river"]
OBJECTS = ["drink", "book", "ball", "key", "ring", "letter", "gift", "bone"]
VERBS = ["gave", "handed", "sent", "passed", "showed", "threw"]
SPECIAL_TOKENS = ["<|endoftext|>", "<pad>"]


def _corpus(seed: int = 0) -> list[str]:
    """Sentences in the shape of IOI, gendered-pronoun, greater-than and MCQA prompts, every word
    repeated."""
    rng = random.Random(seed)
    lines: list[str] = []
    for a, b in itertools.permutations(NAMES[:12], 2):
        place, obj, verb = rng.choice(PLACES), rng.choice(OBJECTS), rng.choice(VERBS)
        lines.append(f"When {a} and {b} went to the {place}, {b} {verb} a {obj} to {a}.")
        lines.append(f"Then, {a} and {b} had a long day at the {place}. {b} {verb} the {obj} to {a}.")
    for name in NAMES:
        pronoun = rng.choice(["he", "she"])
        lines.append(f"{name} is so nice. I think {pronoun} is great, and {pronoun} said so.")
        lines.append(f"So {name} is a doctor. Is it true that {pronoun} likes it? Yes, {pronoun} does.")
    for yy in range(10, 100):
        lines.append(f"The war lasted from the year 17{yy} to the year 17{(yy + 7) % 90 + 10}.")
        lines.append(f"It lasted from 17{yy} to 18{yy}, {yy} years.")
    for _ in range(30):  # MCQA: the letters " A" .. " D" after "Answer:" become single tokens
        subject, colour = rng.choice(mcqa.FACTS)
        options = [colour, *rng.sample([c for c in mcqa.COLOURS if c != colour], 3)]
        rng.shuffle(options)
        lines.append(f"{mcqa.prompt(subject, options)} {mcqa.LETTERS[options.index(colour)]}")
    return lines * 3


def build_tokenizer(directory: str | Path, *, vocab_size: int = 700, seed: int = 0) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on task-like text and save it to ``directory`` (Hugging Face layout)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<pad>",
    )
    fast.padding_side = "right"
    fast.save_pretrained(str(directory))
    return fast


def _randomize(model: PreTrainedModel, seed: int, std: float) -> None:
    """Give every parameter (biases and norm scales included) a random, non-trivial value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * std
            is_norm = "ln" in name or "norm" in name
            param.copy_(1.0 + noise if is_norm and param.dim() == 1 and "bias" not in name else noise)


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    return {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, directory: Path) -> Path:
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    return directory


def tiny_gpt2(
    directory: str | Path, *, n_layer: int = 2, n_head: int = 4, d_model: int = 32, seed: int = 0,
    std: float = 0.2,
) -> Path:
    """A tiny GPT-2 checkpoint (learned position embeddings, LayerNorm, biases everywhere)."""
    directory = Path(directory)
    tokenizer = build_tokenizer(directory)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=64, n_embd=d_model, n_layer=n_layer, n_head=n_head,
        n_inner=2 * d_model, attn_implementation="eager", **_special_ids(tokenizer),
    )
    model = GPT2LMHeadModel(config)
    _randomize(model, seed, std)
    return _save(model, tokenizer, directory)


_LLAMA_FAMILY = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "phi3": (Phi3Config, Phi3ForCausalLM),
    "olmo": (OlmoConfig, OlmoForCausalLM),
    "olmo2": (Olmo2Config, Olmo2ForCausalLM),
    "gemma": (GemmaConfig, GemmaForCausalLM),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM),
}
# What each family's tiny config sets beyond the shared shape, so that every feature its adapter
# handles changes the logits: a head width apart from D / H (Qwen3, Gemma), partial rotary, a
# sliding window and an untied unembedding (Phi-3), clamped q/k/v (OLMo: 1.0 clips a good share
# of this model's projections), one KV head (Gemma-2B's multi-query attention).
_FAMILY_FEATURES: dict[str, dict] = {
    "qwen3": {"head_dim": 16},
    "phi3": {"partial_rotary_factor": 0.5, "sliding_window": 4, "tie_word_embeddings": False},
    "olmo": {"clip_qkv": 1.0, "num_key_value_heads": 4},
    "olmo2": {"tie_word_embeddings": False},
    "gemma": {"head_dim": 16, "num_key_value_heads": 1, "hidden_act": "gelu_pytorch_tanh"},
    # Gemma-2: 3 layers, so sliding (window 3, below the tests' lengths) and full attention
    # alternate; soft-caps small enough to bite; a query_pre_attn_scalar apart from head_dim
    "gemma2": {
        "num_hidden_layers": 3, "head_dim": 12, "sliding_window": 3, "attn_logit_softcapping": 2.0,
        "final_logit_softcapping": 5.0, "query_pre_attn_scalar": 10,
    },
}


def tiny_llama(
    directory: str | Path, *, kind: str = "llama", n_layer: int = 2, n_head: int = 4, n_kv_head: int = 2,
    d_model: int = 32, rope_scaling: dict | None = None, bias: bool = False, tie: bool = True,
    seed: int = 0, std: float = 0.2,
) -> Path:
    """A tiny LLaMA-family checkpoint: GQA, RoPE (optionally scaled), RMSNorm, optional biases.

    ``kind`` is "llama", "qwen2" (q/k/v biases, as Qwen2 has), "mistral", or one of the families
    with their features in ``_FAMILY_FEATURES`` ("qwen3", "phi3", "olmo", "gemma"). ``bias`` adds
    attention and MLP biases to a LLaMA config (``attention_bias`` / ``mlp_bias``).
    """
    directory = Path(directory)
    tokenizer = build_tokenizer(directory)
    config_cls, model_cls = _LLAMA_FAMILY[kind]
    kwargs = dict(
        vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=2 * d_model,
        num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_kv_head,
        max_position_embeddings=64, tie_word_embeddings=tie, attn_implementation="eager",
        **_special_ids(tokenizer),
    )
    if rope_scaling is not None:
        kwargs["rope_scaling"] = rope_scaling
    if kind == "llama" and bias:
        kwargs.update(attention_bias=True, mlp_bias=True)
    kwargs.update(_FAMILY_FEATURES.get(kind, {}))
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs))
    _randomize(model, seed, std)
    return _save(model, tokenizer, directory)


def tiny_gpt_neox(
    directory: str | Path, *, parallel: bool = True, n_layer: int = 3, n_head: int = 4,
    d_model: int = 32, rotary_pct: float = 0.25, seed: int = 0, std: float = 0.2,
) -> Path:
    """A tiny GPT-NeoX (Pythia) checkpoint: LayerNorm with biases, fused q/k/v, partial rotary
    (``rotary_pct`` of every head's dimensions), an untied unembedding, and attention and MLP in
    parallel on each layer's input unless ``parallel`` is False."""
    directory = Path(directory)
    tokenizer = build_tokenizer(directory)
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=d_model, num_hidden_layers=n_layer,
        num_attention_heads=n_head, intermediate_size=2 * d_model, max_position_embeddings=64,
        rotary_pct=rotary_pct, use_parallel_residual=parallel, tie_word_embeddings=False,
        attn_implementation="eager", **_special_ids(tokenizer),
    )
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(config)
    _randomize(model, seed, std)
    return _save(model, tokenizer, directory)
