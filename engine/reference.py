"""The masked forward of the Edge Pruning paper, written for clarity: the specification.

Edge Pruning (Bhaskar et al., NeurIPS 2024) disentangles the residual stream. Every *writer* (the
embeddings, each attention head, each MLP) adds an output y_w; every *reader* (each head's query,
key and value input, each MLP's input, the logits) gets its own input, the mask-weighted sum of the
outputs of the writers upstream of it::

    x_r = sum_w  M[w, r] * y_w + (1 - M[w, r]) * y~_w        M[w, r] = z_wr * z_w

where y_w is writer w's output in this (masked) run, y~_w its ablation value (its output in the
corrupted run, its mean over a batch, or zero), z_wr the edge mask and z_w the node mask. With
every mask 1 each reader sees the clean residual stream and this is the model itself; with every
mask 0 each reader sees the ablated one (for corrupted ablation, the model on the corrupted input).

:func:`reference_forward` computes exactly that, with loops over readers and writers and each
head's weights read one at a time from the module (every Hugging Face family the adapters
support, or a Tracr model), independent of the adapters. It is slow and meant for reading and for tests:
``edgeprune.engine.masked.masked_forward`` computes the same logits, fast.

Writers and readers are named as in :mod:`edgeprune.engine.graph` ("tok", "pos", "a{l}.h{h}",
"m{l}"; "a{l}.h{h}.q|k|v", "m{l}", "logits"). Shapes: B batch, T tokens, D width, K head width,
V vocab.
"""

from __future__ import annotations

import math

import torch
from torch import nn


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
    """Logits [B, T, V] of the masked model and every writer's output {name: [B, T, D]}.

    ids [B, T]; valid [B, T] bool (right padding). ``edge[(writer, reader)]`` is z_wr and
    ``node[writer]`` z_w, both 1 where absent; ``ablated[writer]`` is y~_w ([B|1, T, D]), zero
    where absent. ``embeddings`` ({"tok": [B, T, D], "pos": ...}) replace the embedding writers'
    outputs on ``ids``. Every reader's input x_r [B, T, D] is put in ``inputs`` when given (kept
    with ``retain_grad`` where it requires grad, so that after a backward ``inputs[r].grad`` is
    dL/dx_r). Differentiable; see :func:`reference_run` for the no-grad form.
    """
    f = _heads_of(model)
    edge, node, ablated = edge or {}, node or {}, ablated or {}
    ys = dict(embeddings) if embeddings is not None else f.embeddings(ids)  # y_w so far
    order = list(ys)  # the writers so far, in graph order: every one is upstream of what follows

    def read(reader: str) -> torch.Tensor:
        """x_r: the mask-weighted sum of the upstream writers' clean and ablated outputs."""
        x = torch.zeros_like(ys["tok"])  # [B, T, D]
        for w in order:
            m = edge.get((w, reader), 1.0) * node.get(w, 1.0)
            x = x + m * ys[w] + (1 - m) * ablated.get(w, torch.zeros_like(ys[w]))
        if inputs is not None:
            if x.requires_grad:
                x.retain_grad()
            inputs[reader] = x
        return x

    group = f.H // f.KV  # query heads per key/value head
    for l in range(f.L):
        kv = [(f.k(l, g, read(f"a{l}.h{g}.k")), f.v(l, g, read(f"a{l}.h{g}.v")))
              for g in range(f.KV)]
        heads = {}
        for h in range(f.H):
            q = f.q(l, h, read(f"a{l}.h{h}.q"))
            k, v = kv[h // group]
            heads[f"a{l}.h{h}"] = f.head_out(l, h, f.attend(l, q, k, v, valid))
        heads = f.post_attention(l, heads)
        if f.parallel:  # the MLP reads the layer's input, as the attention does
            x_mlp = read(f"m{l}")
        ys.update(heads)  # a layer's heads all read before any of them writes
        order += list(heads)
        if not f.parallel:  # the MLP reads its own layer's heads too
            x_mlp = read(f"m{l}")
        ys[f"m{l}"] = f.mlp(l, x_mlp)
        order.append(f"m{l}")
    return f.unembed(read("logits")), ys


@torch.no_grad()
def reference_run(
    model: nn.Module,
    ids: torch.Tensor,
    valid: torch.Tensor,
    edge: dict[tuple[str, str], float] | None = None,
    node: dict[str, float] | None = None,
    ablated: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`reference_forward` without autograd: logits [B, T, V] and every writer's output.

    ``reference_run(model, corrupted_ids, valid)[1]`` are the ablation values of corrupted
    ablation (every mask 1: the plain run's writer outputs)."""
    return reference_forward(model, ids, valid, edge, node, ablated)


# ---- one head at a time, read from the module ---------------------------------------------------


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class _Heads:
    """A model's pieces head by head: L layers, H query heads, KV key/value heads, width D, head
    width K. Every reader input x is [B, T, D]; q, k, v and z are [B, T, K]."""

    L: int
    H: int
    KV: int
    D: int
    K: int
    causal = True
    parallel = False  # attention and MLP both read the layer's input (GPT-NeoX)

    def embeddings(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The embedding writers' outputs {"tok": [B, T, D], ["pos": [B, T, D]]}."""
        raise NotImplementedError

    def q(self, l: int, h: int, x: torch.Tensor) -> torch.Tensor:
        return self._proj(l, 0, h, x)

    def k(self, l: int, g: int, x: torch.Tensor) -> torch.Tensor:
        return self._proj(l, 1, g, x)

    def v(self, l: int, g: int, x: torch.Tensor) -> torch.Tensor:
        return self._proj(l, 2, g, x)

    def _proj(self, l: int, which: int, h: int, x: torch.Tensor) -> torch.Tensor:
        """One head's q (which=0), k (1) or v (2) from its own reader input x [B, T, D]."""
        raise NotImplementedError

    def scale(self, l: int) -> float:
        return 1 / math.sqrt(self.K)

    def window(self, l: int) -> int | None:
        return None

    def softcap(self, l: int) -> float | None:
        """Attention logits s become tanh(s / c) * c for this c (None: they stay s)."""
        return None

    def attend(self, l: int, q, k, v, valid: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T * scale + mask) v for one head: [B, T, K] each."""
        T = q.shape[1]
        scores = q @ k.transpose(1, 2) * self.scale(l)  # [B, T, T]
        cap = self.softcap(l)
        if cap is not None:
            scores = torch.tanh(scores / cap) * cap
        allowed = valid[:, None, :].expand(-1, T, T)  # real keys only
        if self.causal:
            allowed = allowed & torch.ones(T, T, dtype=torch.bool).tril()
        window = self.window(l)
        if window is not None:
            i = torch.arange(T)
            allowed = allowed & (i[None, :] > i[:, None] - window)
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)  # [B, T, T]
        return weights.nan_to_num(0.0) @ v  # padded queries may see no key at all

    def head_out(self, l: int, h: int, z: torch.Tensor) -> torch.Tensor:
        """Head h's output z_h @ W_O[h] + b_O / H: its share of the attention output."""
        raise NotImplementedError

    def post_attention(self, l: int, heads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The heads' outputs {name: [B, T, D]} after what the layer does to its attention output
        before the residual (nothing here)."""
        return heads

    def mlp(self, l: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class _HuggingFaceHeads(_Heads):
    """GPT-2 (Conv1D, LayerNorm, learned positions) and LLaMA-style models (RMSNorm, rotary),
    with what Qwen3 (per-head q/k norms), Phi-3 (fused q/k/v, partial rotary), OLMo (clamped
    q/k/v) and Gemma (scaled embeddings) add."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        c = model.config
        self.gpt2 = c.model_type == "gpt2"
        if self.gpt2:
            self.L, self.H, self.KV, self.D = c.n_layer, c.n_head, c.n_head, c.n_embd
        else:
            self.L, self.H = c.num_hidden_layers, c.num_attention_heads
            self.KV, self.D = c.num_key_value_heads, c.hidden_size
        self.K = getattr(c, "head_dim", None) or self.D // self.H  # Qwen3, Gemma: set apart

    def embeddings(self, ids):
        T = ids.shape[1]
        if self.gpt2:
            t = self.model.transformer
            return {"tok": t.wte(ids), "pos": t.wpe(torch.arange(T)).expand(ids.shape[0], T, -1)}
        embed = self.model.model.embed_tokens
        tok = embed(ids)
        if self.model.config.model_type == "gemma" and not hasattr(embed, "embed_scale"):
            # Gemma's sqrt(D) factor, which transformers before 5 applies outside embed_tokens
            tok = tok * torch.tensor(self.D**0.5, dtype=tok.dtype)
        return {"tok": tok}

    def layer(self, l: int) -> nn.Module:
        return self.model.transformer.h[l] if self.gpt2 else self.model.model.layers[l]

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
        attn = block.self_attn
        if hasattr(attn, "qkv_proj"):  # Phi-3: one projection, the q heads' rows, k's, then v's
            lin = attn.qkv_proj
            start = [0, self.H, self.H + self.KV][which] * K + cols.start
            cols = slice(start, start + K)
        else:
            lin = [attn.q_proj, attn.k_proj, attn.v_proj][which]
        out = block.input_layernorm(x) @ lin.weight[cols].T
        if lin.bias is not None:
            out = out + lin.bias[cols]
        clip = getattr(self.model.config, "clip_qkv", None)
        if clip is not None:  # OLMo clamps every q, k and v projection
            out = out.clamp(-clip, clip)
        if which < 2:  # rotary on q and k, after Qwen3's per-head RMSNorm of each
            head_norm = getattr(attn, "q_norm" if which == 0 else "k_norm", None)
            if head_norm is not None:
                out = head_norm(out)
            cos, sin = self.model.model.rotary_emb(out, torch.arange(x.shape[1])[None])
            r = cos.shape[-1]  # partial rotary (Phi-3's partial_rotary_factor): the rest stays
            turned = out[..., :r] * cos + _rotate_half(out[..., :r]) * sin  # float32 for OLMo
            out = torch.cat([turned.to(out.dtype), out[..., r:]], dim=-1)
        return out

    def scale(self, l):
        c = self.model.config
        if not self.gpt2:
            return super().scale(l)
        scale = 1 / math.sqrt(self.K) if c.scale_attn_weights else 1.0
        return scale / (l + 1) if c.scale_attn_by_inverse_layer_idx else scale

    def window(self, l):
        c = self.model.config
        if self.gpt2:
            return None
        if c.model_type in ("mistral", "phi3"):  # the config's window on every layer
            return c.sliding_window
        return getattr(self.layer(l).self_attn, "sliding_window", None)  # Qwen3's, per layer

    def head_out(self, l, h, z):
        block, K = self.layer(l), self.K
        rows = slice(h * K, (h + 1) * K)
        if self.gpt2:
            proj = block.attn.c_proj
            return z @ proj.weight[rows] + proj.bias / self.H
        proj = block.self_attn.o_proj
        out = z @ proj.weight[:, rows].T
        return out if proj.bias is None else out + proj.bias / self.H

    def mlp(self, l, x):
        block = self.layer(l)
        if self.gpt2:
            return block.mlp(block.ln_2(x))
        return block.mlp(block.post_attention_layernorm(x))

    def unembed(self, x):
        norm = self.model.transformer.ln_f if self.gpt2 else self.model.model.norm
        return self.model.lm_head(norm(x))


class _TracrHeads(_Heads):
    """A compiled Tracr model: no norms, learned positions, ReLU MLPs, q/k/v/o ``nn.Linear``s."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        c = model.config
        self.L, self.H, self.KV, self.D = c.num_layers, c.num_heads, c.num_heads, c.d_model
        self.K = c.key_size
        self.causal = bool(c.causal)

    def embeddings(self, ids):
        T = ids.shape[1]
        return {
            "tok": self.model.tok_embed(ids),
            "pos": self.model.pos_embed(torch.arange(T)).expand(ids.shape[0], T, -1),
        }

    def _linear(self, linear: nn.Linear, h: int, x: torch.Tensor) -> torch.Tensor:
        rows = slice(h * self.K, (h + 1) * self.K)
        return x @ linear.weight[rows].T + linear.bias[rows]

    def q(self, l, h, x):
        return self._linear(self.model.layers[l].attn.q, h, x)

    def k(self, l, g, x):
        return self._linear(self.model.layers[l].attn.k, g, x)

    def v(self, l, g, x):
        return self._linear(self.model.layers[l].attn.v, g, x)

    def head_out(self, l, h, z):
        o = self.model.layers[l].attn.o
        rows = slice(h * self.K, (h + 1) * self.K)
        return z @ o.weight[:, rows].T + o.bias / self.H

    def mlp(self, l, x):
        mlp = self.model.layers[l].mlp
        return mlp.fc_out(torch.relu(mlp.fc_in(x)))

    def unembed(self, x):
        return self.model.unembed(x)


class _Gemma2Heads(_HuggingFaceHeads):
    """Gemma-2: LLaMA's pieces with Gemma's norms, a query_pre_attn_scalar scale, soft-capped
    attention and final logits, sliding windows on the config's "sliding_attention" layers, a
    norm of the attention output (each head gets its share of the normalised sum) and norms
    before and after the MLP."""

    def scale(self, l):
        return self.model.config.query_pre_attn_scalar**-0.5

    def window(self, l):
        c = self.model.config
        return c.sliding_window if c.layer_types[l] == "sliding_attention" else None

    def softcap(self, l):
        return self.model.config.attn_logit_softcapping

    def post_attention(self, l, heads):
        norm = self.layer(l).post_attention_layernorm
        total = sum(heads.values())  # the layer's attention output [B, T, D]
        scale = (1 + norm.weight) * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + norm.eps)
        return {name: y * scale for name, y in heads.items()}

    def mlp(self, l, x):
        block = self.layer(l)
        return block.post_feedforward_layernorm(block.mlp(block.pre_feedforward_layernorm(x)))

    def unembed(self, x):
        logits = super().unembed(x)
        cap = self.model.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap


class _NeoXHeads(_Heads):
    """GPT-NeoX / Pythia: LayerNorm, one fused query_key_value whose rows are head h's q, k and v
    in turn, rotary on the first ``rotary_ndims`` dimensions of every head, and (with
    ``use_parallel_residual``) attention and MLP both on the layer's input."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        c = model.config
        self.L, self.H, self.D = c.num_hidden_layers, c.num_attention_heads, c.hidden_size
        self.KV, self.K = self.H, self.D // self.H
        self.parallel = bool(c.use_parallel_residual)

    def layer(self, l: int) -> nn.Module:
        return self.model.gpt_neox.layers[l]

    def embeddings(self, ids):
        return {"tok": self.model.gpt_neox.embed_in(ids)}

    def _proj(self, l: int, which: int, h: int, x: torch.Tensor) -> torch.Tensor:
        """One head's q (which=0), k (1) or v (2): rows (3h + which) * K .. + K of the fused
        projection (the model views its output as [..., H, 3K])."""
        block, K = self.layer(l), self.K
        fused = block.attention.query_key_value
        rows = slice((3 * h + which) * K, (3 * h + which + 1) * K)
        out = block.input_layernorm(x) @ fused.weight[rows].T
        if fused.bias is not None:
            out = out + fused.bias[rows]
        if which < 2:  # rotary on q and k, on the first r dimensions only
            r = block.attention.rotary_ndims
            cos, sin = self.model.gpt_neox.rotary_emb(out, torch.arange(x.shape[1])[None])
            turned = out[..., :r] * cos + _rotate_half(out[..., :r]) * sin
            out = torch.cat([turned, out[..., r:]], dim=-1)
        return out

    def head_out(self, l, h, z):
        dense = self.layer(l).attention.dense
        out = z @ dense.weight[:, h * self.K : (h + 1) * self.K].T
        return out if dense.bias is None else out + dense.bias / self.H

    def mlp(self, l, x):
        block = self.layer(l)
        return block.mlp(block.post_attention_layernorm(x))

    def unembed(self, x):
        return self.model.lm_head(self.model.gpt_neox.final_layer_norm(x))


class _Olmo2Heads(_HuggingFaceHeads):
    """OLMo-2: no norm on a layer's inputs; q_norm and k_norm normalise the queries (keys) of all
    heads together, so a head's query is its slice of the normed projection by every head of
    its reader's input; a norm of the attention output (each head gets its share of the
    normalised sum) and one of the MLP output."""

    def _proj(self, l, which, h, x):
        attn, K = self.layer(l).self_attn, self.K
        lin = [attn.q_proj, attn.k_proj, attn.v_proj][which]
        out = x @ lin.weight.T  # every head's projection of this reader's input [B, T, R*K]
        if lin.bias is not None:
            out = out + lin.bias
        if which < 2:
            out = [attn.q_norm, attn.k_norm][which](out)
        out = out[..., h * K : (h + 1) * K]  # [B, T, K]
        if which < 2:
            cos, sin = self.model.model.rotary_emb(out, torch.arange(x.shape[1])[None])
            out = (out * cos + _rotate_half(out) * sin).to(out.dtype)
        return out

    def post_attention(self, l, heads):
        norm = self.layer(l).post_attention_layernorm
        total = sum(heads.values())  # the layer's attention output [B, T, D]
        scale = norm.weight * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        return {name: y * scale for name, y in heads.items()}

    def mlp(self, l, x):
        block = self.layer(l)
        return block.post_feedforward_layernorm(block.mlp(x))


def _heads_of(model: nn.Module) -> _Heads:
    if type(model).__name__ == "TracrModel":
        return _TracrHeads(model)
    if model.config.model_type == "gpt_neox":
        return _NeoXHeads(model)
    if model.config.model_type == "olmo2":
        return _Olmo2Heads(model)
    if model.config.model_type == "gemma2":
        return _Gemma2Heads(model)
    return _HuggingFaceHeads(model)
