"""Tiny in-memory models for the masked-forward tests, and a slow, obviously correct reference.

Every parameter (biases and norm weights included, which Hugging Face initialises to 0 / 1) is
re-drawn at random so a mistake in any of them shows in the logits.
"""

from __future__ import annotations

import copy
import math
import types

import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 40
LLAMA_SHAPE = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 40,
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
}


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(
                torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p.dim() == 1 else 0.0) * 0.5
            )
    return module.eval()


def _float64_rms_norm(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm in the input's precision (HF's computes in float32 even for float64 models)."""
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def float64(module: nn.Module) -> nn.Module:
    """A float64 copy of an HF model whose RMSNorms compute in float64 too."""
    module = copy.deepcopy(module).double()
    for sub in module.modules():
        if type(sub).__name__.endswith("RMSNorm"):
            sub.forward = types.MethodType(_float64_rms_norm, sub)
    return module


def tiny_models() -> dict[str, nn.Module]:
    """name -> tiny randomly weighted HF model covering every family and feature we support."""
    torch.manual_seed(0)
    return {
        "gpt2": _randomise(
            GPT2LMHeadModel(
                GPT2Config(
                    n_layer=2,
                    n_head=4,
                    n_embd=32,
                    vocab_size=VOCAB,
                    n_positions=32,
                    bos_token_id=0,
                    eos_token_id=0,
                )
            ),
            1,
        ),
        # 5 layers: mixing blocks of 2 layers ([0, 1], [2, 3], [4]) in the masked forward
        "gpt2-deep": _randomise(
            GPT2LMHeadModel(
                GPT2Config(
                    n_layer=5,
                    n_head=2,
                    n_embd=16,
                    vocab_size=VOCAB,
                    n_positions=32,
                    bos_token_id=0,
                    eos_token_id=0,
                )
            ),
            7,
        ),
        "llama-gqa": _randomise(LlamaForCausalLM(LlamaConfig(**LLAMA_SHAPE)), 2),
        "llama-rope-llama3-bias-untied": _randomise(
            LlamaForCausalLM(
                LlamaConfig(
                    **LLAMA_SHAPE,
                    attention_bias=True,
                    mlp_bias=True,
                    tie_word_embeddings=False,
                    rope_scaling={
                        "rope_type": "llama3",
                        "factor": 8.0,
                        "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 4,
                    },
                )
            ),
            3,
        ),
        "llama-rope-linear": _randomise(
            LlamaForCausalLM(
                LlamaConfig(**LLAMA_SHAPE, rope_scaling={"rope_type": "linear", "factor": 2.0})
            ),
            4,
        ),
        "qwen2": _randomise(Qwen2ForCausalLM(Qwen2Config(**LLAMA_SHAPE)), 5),
        "mistral-window": _randomise(
            MistralForCausalLM(
                MistralConfig(**{**LLAMA_SHAPE, "num_key_value_heads": 1}, sliding_window=3)
            ),
            6,
        ),
    }


def batch(
    seed: int = 0, *, B: int = 3, T: int = 7
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, corrupted_ids, attention_mask), right-padded with unequal lengths."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=gen)
    corrupted = torch.randint(0, VOCAB, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(1, B):
        mask[b, T - 2 * b :] = 0
    return ids, corrupted, mask


# ---- the slow reference --------------------------------------------------------------------


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class _Family:
    """Per-head weights read straight from the HF module, head by head."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.gpt2 = model.config.model_type == "gpt2"
        c = model.config
        if self.gpt2:
            self.L, self.H, self.KV, self.D = c.n_layer, c.n_head, c.n_head, c.n_embd
        else:
            self.L, self.H, self.KV, self.D = (
                c.num_hidden_layers,
                c.num_attention_heads,
                c.num_key_value_heads,
                c.hidden_size,
            )
        self.K = self.D // self.H

    def embeddings(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        T = ids.shape[1]
        if self.gpt2:
            t = self.model.transformer
            return {"tok": t.wte(ids), "pos": t.wpe(torch.arange(T)).expand(ids.shape[0], T, -1)}
        return {"tok": self.model.model.embed_tokens(ids)}

    def layer(self, l: int) -> nn.Module:
        return self.model.transformer.h[l] if self.gpt2 else self.model.model.layers[l]

    def q(self, l: int, h: int, x: torch.Tensor) -> torch.Tensor:
        return self._proj(l, 0, h, x)

    def k(self, l: int, g: int, x: torch.Tensor) -> torch.Tensor:
        return self._proj(l, 1, g, x)

    def v(self, l: int, g: int, x: torch.Tensor) -> torch.Tensor:
        return self._proj(l, 2, g, x)

    def _proj(self, l: int, which: int, h: int, x: torch.Tensor) -> torch.Tensor:
        """One head's q (which=0), k (1) or v (2) from its own reader input x [B, T, D]."""
        block, K, D = self.layer(l), self.K, self.D
        cols = slice(h * K, (h + 1) * K)
        if self.gpt2:
            w, b = block.attn.c_attn.weight, block.attn.c_attn.bias  # [D, 3D], [3D]
            off = which * D
            return (
                block.ln_1(x) @ w[:, off + cols.start : off + cols.stop]
                + b[off + cols.start : off + cols.stop]
            )
        lin = [block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj][which]
        out = block.input_layernorm(x) @ lin.weight[cols].T
        if lin.bias is not None:
            out = out + lin.bias[cols]
        if which < 2:  # rotary on q and k
            cos, sin = self.model.model.rotary_emb(out, torch.arange(x.shape[1])[None])
            out = out * cos + _rotate_half(out) * sin
        return out

    def attend(self, l: int, q, k, v, valid: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T * scale + mask) v for one head: [B, T, K] each."""
        T = q.shape[1]
        scores = q @ k.transpose(1, 2) / math.sqrt(self.K)  # [B, T, T]
        allowed = valid[:, None, :] & torch.ones(T, T, dtype=torch.bool).tril()
        window = (
            None
            if self.gpt2
            else self.model.config.sliding_window
            if self.model.config.model_type == "mistral"
            else None
        )
        if window is not None:
            i = torch.arange(T)
            allowed = allowed & (i[None, :] > i[:, None] - window)
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)  # [B, T, T]
        return weights.nan_to_num(0.0) @ v  # padded queries may see no key at all

    def head_out(self, l: int, h: int, z: torch.Tensor) -> torch.Tensor:
        block, K = self.layer(l), self.K
        rows = slice(h * K, (h + 1) * K)
        if self.gpt2:
            proj = block.attn.c_proj
            return z @ proj.weight[rows] + proj.bias / self.H
        proj = block.self_attn.o_proj
        out = z @ proj.weight[:, rows].T
        return out if proj.bias is None else out + proj.bias / self.H

    def mlp(self, l: int, x: torch.Tensor) -> torch.Tensor:
        block = self.layer(l)
        if self.gpt2:
            return block.mlp(block.ln_2(x))
        return block.mlp(block.post_attention_layernorm(x))

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.model.transformer.ln_f if self.gpt2 else self.model.model.norm
        return self.model.lm_head(norm(x))


@torch.no_grad()
def reference_run(
    model: nn.Module,
    ids: torch.Tensor,
    valid: torch.Tensor,
    edge: dict[tuple[str, str], float] | None = None,
    node: dict[str, float] | None = None,
    ablated: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits [B, T, V] and every writer's output, by explicit loops over readers and writers.

    ``edge[(writer, reader)]`` and ``node[writer]`` default to 1; ``ablated[writer]`` to zero.
    Reader r's input is sum over its upstream writers w of M*y_w + (1-M)*y~_w, M = edge * node.
    """
    return reference_forward(model, ids, valid, edge, node, ablated)


def reference_forward(
    model: nn.Module,
    ids: torch.Tensor,
    valid: torch.Tensor,
    edge: dict[tuple[str, str], float] | None = None,
    node: dict[str, float] | None = None,
    ablated: dict[str, torch.Tensor] | None = None,
    *,
    embeddings: dict[str, torch.Tensor] | None = None,
    inputs: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`reference_run` under autograd. ``embeddings`` ({"tok": [B, T, D], "pos": ...})
    replace the embedding writers' outputs on ``ids``; every reader's input [B, T, D] is put in
    ``inputs`` (by reader name, each computed once and kept with ``retain_grad``, so that after a
    backward ``inputs[r].grad`` is dL/dx_r)."""
    f = _Family(model)
    edge, node, ablated = edge or {}, node or {}, ablated or {}
    ys = dict(embeddings) if embeddings is not None else f.embeddings(ids)
    order = list(ys)  # writers so far, in graph order

    def read(reader: str) -> torch.Tensor:
        total = torch.zeros_like(ys["tok"])
        for w in order:
            m = edge.get((w, reader), 1.0) * node.get(w, 1.0)
            total = total + m * ys[w] + (1 - m) * ablated.get(w, torch.zeros_like(ys[w]))
        if inputs is not None:
            if total.requires_grad:
                total.retain_grad()
            inputs[reader] = total
        return total

    group = f.H // f.KV
    for l in range(f.L):
        new = {}
        kv = [
            (f.k(l, g, read(f"a{l}.h{g}.k")), f.v(l, g, read(f"a{l}.h{g}.v"))) for g in range(f.KV)
        ]
        for h in range(f.H):
            q = f.q(l, h, read(f"a{l}.h{h}.q"))
            k, v = kv[h // group]
            new[f"a{l}.h{h}"] = f.head_out(l, h, f.attend(l, q, k, v, valid))
        ys.update(new)
        order += list(new)
        ys[f"m{l}"] = f.mlp(l, read(f"m{l}"))
        order.append(f"m{l}")
    return f.unembed(read("logits")), ys
