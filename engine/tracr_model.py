"""Compiled Tracr models in PyTorch, loaded from the ``tracr-npz/1`` format.

A ``tracr-npz/1`` export is a folder holding ``config.json`` and ``model.npz`` (float32 arrays;
see ``tools/compile_tracr.py``, which writes them with tracr). The model computes exactly what
tracr's assembled model does: no layer norm, attention logits q·k / sqrt(key_size) with a softmax
over every position (no causal mask unless the config asks for one), ReLU MLPs, a residual stream
that is the sum of the embeddings and every attention and MLP output, and logits = residual @
unembed. ``output_encoding`` says how to read the logits: "categorical" (argmax over
``output_vocab``) or "numerical" (a single column, the program's numerical output value).

Shapes: B batch, T tokens, D model width, H heads, K key size, F MLP hidden size, V output vocab.
"""

from __future__ import annotations

import json
import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeprune.engine.errors import InvalidArgument, ModelNotFound

FORMAT = "tracr-npz/1"
OUTPUT_ENCODINGS = ("categorical", "numerical")


@dataclass(frozen=True)
class TracrConfig:
    """The ``config.json`` of a ``tracr-npz/1`` export."""

    num_layers: int
    num_heads: int
    key_size: int
    mlp_hidden_size: int
    d_model: int
    activation: str
    causal: bool
    input_vocab: tuple[str, ...]  # token strings in id order, bos and pad included
    output_vocab: tuple[str, ...]  # unembed columns in order
    bos: str
    max_seq_len: int  # including the BOS position
    pad: str | None = None
    output_encoding: str = "categorical"
    name: str | None = None

    @classmethod
    def from_json(cls, raw: object) -> TracrConfig:
        """Validate a parsed config.json; InvalidArgument names the field at fault."""
        if not isinstance(raw, dict):
            raise InvalidArgument("config.json must hold a JSON object", field="config.json")
        if raw.get("format") != FORMAT:
            raise InvalidArgument(
                f"config.json format is {raw.get('format')!r}; this engine reads {FORMAT!r}",
                field="config.json:format",
            )
        if raw.get("layer_norm", False) is not False:
            raise InvalidArgument("tracr-npz/1 models have no layer norm; layer_norm must be false",
                                  field="config.json:layer_norm")
        if raw.get("activation") != "relu":
            raise InvalidArgument(f"activation must be 'relu', not {raw.get('activation')!r}",
                                  field="config.json:activation")
        ints = {k: _positive_int(raw, k) for k in
                ("num_layers", "num_heads", "key_size", "mlp_hidden_size", "d_model", "max_seq_len")}
        causal = raw.get("causal", False)
        if not isinstance(causal, bool):
            raise InvalidArgument("causal must be true or false", field="config.json:causal")
        input_vocab = _vocab(raw, "input_vocab")
        output_vocab = _vocab(raw, "output_vocab")
        bos = raw.get("bos")
        if bos not in input_vocab:
            raise InvalidArgument(f"bos {bos!r} is not in input_vocab", field="config.json:bos")
        pad = raw.get("pad")
        if pad is not None and pad not in input_vocab:
            raise InvalidArgument(f"pad {pad!r} is not in input_vocab", field="config.json:pad")
        encoding = raw.get("output_encoding", "categorical")
        if encoding not in OUTPUT_ENCODINGS:
            raise InvalidArgument(f"output_encoding must be one of {OUTPUT_ENCODINGS}",
                                  field="config.json:output_encoding")
        if encoding == "numerical" and len(output_vocab) != 1:
            raise InvalidArgument("a numerical output has exactly one output_vocab entry",
                                  field="config.json:output_vocab")
        name = raw.get("name")
        return cls(**ints, activation="relu", causal=causal, input_vocab=input_vocab,
                   output_vocab=output_vocab, bos=bos, pad=pad, output_encoding=encoding,
                   name=name if isinstance(name, str) else None)

    def array_shapes(self) -> dict[str, tuple[int, ...]]:
        """The name and shape of every array model.npz must hold."""
        d, hk, f = self.d_model, self.num_heads * self.key_size, self.mlp_hidden_size
        shapes = {
            "tok_embed": (len(self.input_vocab), d),
            "pos_embed": (self.max_seq_len, d),
            "unembed": (d, len(self.output_vocab)),
        }
        for layer in range(self.num_layers):
            p = f"layers.{layer}"
            for name in ("q", "k", "v"):
                shapes[f"{p}.attn.{name}.w"], shapes[f"{p}.attn.{name}.b"] = (d, hk), (hk,)
            shapes[f"{p}.attn.o.w"], shapes[f"{p}.attn.o.b"] = (hk, d), (d,)
            shapes[f"{p}.mlp.fc_in.w"], shapes[f"{p}.mlp.fc_in.b"] = (d, f), (f,)
            shapes[f"{p}.mlp.fc_out.w"], shapes[f"{p}.mlp.fc_out.b"] = (f, d), (d,)
        return shapes


def _positive_int(raw: dict, key: str) -> int:
    value = raw.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidArgument(f"{key} must be a positive integer, not {value!r}",
                              field=f"config.json:{key}")
    return value


def _vocab(raw: dict, key: str) -> tuple[str, ...]:
    vocab = raw.get(key)
    if (
        not isinstance(vocab, list)
        or not vocab
        or not all(isinstance(t, str) and t and not any(c.isspace() for c in t) for t in vocab)
    ):
        raise InvalidArgument(f"{key} must be a non-empty list of tokens without whitespace",
                              field=f"config.json:{key}")
    if len(set(vocab)) != len(vocab):
        raise InvalidArgument(f"{key} holds duplicate tokens", field=f"config.json:{key}")
    return tuple(vocab)


class TracrAttention(nn.Module):
    """Multi-head attention; head h owns columns [h*K, (h+1)*K) of q/k/v and rows of o."""

    def __init__(self, config: TracrConfig) -> None:
        super().__init__()
        hk = config.num_heads * config.key_size
        self.num_heads, self.key_size, self.causal = config.num_heads, config.key_size, config.causal
        self.q = nn.Linear(config.d_model, hk)
        self.k = nn.Linear(config.d_model, hk)
        self.v = nn.Linear(config.d_model, hk)
        self.o = nn.Linear(hk, config.d_model)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """x [B, T, D], key_mask [B, T] (True = attendable) -> [B, T, D]."""
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.num_heads, self.key_size).transpose(1, 2)
                   for p in (self.q, self.k, self.v))  # [B, H, T, K] each
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.key_size)  # [B, H, T, T]
        allowed = key_mask[:, None, None, :]  # [B, 1, 1, T]
        if self.causal:
            allowed = allowed & torch.ones(t, t, dtype=torch.bool, device=x.device).tril()  # [B,1,T,T]
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        z = scores.softmax(dim=-1) @ v  # [B, H, T, K]
        return self.o(z.transpose(1, 2).reshape(b, t, -1))  # [B, T, D]


class TracrMLP(nn.Module):
    """ReLU MLP (tracr's categorical lookup tables and numerical MLPs alike)."""

    def __init__(self, config: TracrConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(config.d_model, config.mlp_hidden_size)
        self.fc_out = nn.Linear(config.mlp_hidden_size, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(torch.relu(self.fc_in(x)))  # [B, T, D]


class TracrLayer(nn.Module):
    """One attention block then one MLP block, each added to the residual stream."""

    def __init__(self, config: TracrConfig) -> None:
        super().__init__()
        self.attn = TracrAttention(config)
        self.mlp = TracrMLP(config)


class TracrModel(nn.Module):
    """A compiled RASP program: ``forward(input_ids [B, T], attention_mask) -> logits [B, T, V]``."""

    def __init__(self, config: TracrConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embed = nn.Embedding(len(config.input_vocab), config.d_model)
        self.pos_embed = nn.Embedding(config.max_seq_len, config.d_model)
        self.layers = nn.ModuleList(TracrLayer(config) for _ in range(config.num_layers))
        self.unembed = nn.Linear(config.d_model, len(config.output_vocab), bias=False)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [B, T, V]; ``attention_mask`` [B, T] (1 = token, 0 = padding, never attended)."""
        t, n_in = input_ids.shape[1], len(self.config.input_vocab)
        if t > self.config.max_seq_len:
            raise InvalidArgument(
                f"input has {t} tokens; this model takes at most {self.config.max_seq_len}",
                field="input_ids",
            )
        if input_ids.numel() and not 0 <= int(input_ids.min()) <= int(input_ids.max()) < n_in:
            raise InvalidArgument(f"token ids must lie in [0, {n_in})", field="input_ids")
        key_mask = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                    else attention_mask.to(torch.bool))  # [B, T]
        positions = torch.arange(t, device=input_ids.device)  # [T]
        x = self.tok_embed(input_ids) + self.pos_embed(positions)  # [B, T, D]
        for layer in self.layers:
            x = x + layer.attn(x, key_mask)  # [B, T, D]
            x = x + layer.mlp(x)  # [B, T, D]
        return self.unembed(x)  # [B, T, V]

    def decode_logits(self, logits: torch.Tensor) -> list[str] | list[float]:
        """Read one sequence's logits [T, V] as tracr does: argmax tokens, or the numerical value."""
        if self.config.output_encoding == "numerical":
            return logits[:, 0].tolist()
        return [self.config.output_vocab[i] for i in logits.argmax(dim=-1).tolist()]

    @torch.no_grad()
    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Copy validated tracr-npz/1 arrays (``x @ w + b`` layout) into the modules."""

        def put(linear: nn.Linear, prefix: str) -> None:
            linear.weight.copy_(torch.from_numpy(arrays[f"{prefix}.w"]).T)  # [out, in]
            linear.bias.copy_(torch.from_numpy(arrays[f"{prefix}.b"]))

        self.tok_embed.weight.copy_(torch.from_numpy(arrays["tok_embed"]))
        self.pos_embed.weight.copy_(torch.from_numpy(arrays["pos_embed"]))
        self.unembed.weight.copy_(torch.from_numpy(arrays["unembed"]).T)  # [V, D]
        for i, layer in enumerate(self.layers):
            for name in ("q", "k", "v", "o"):
                put(getattr(layer.attn, name), f"layers.{i}.attn.{name}")
            put(layer.mlp.fc_in, f"layers.{i}.mlp.fc_in")
            put(layer.mlp.fc_out, f"layers.{i}.mlp.fc_out")


class TracrTokenizer:
    """Maps space-separated vocabulary strings ("BOS 1 3 2") to ids and back.

    ``encode`` takes the text literally: the caller writes the BOS token first, as tracr expects.
    """

    def __init__(self, vocab: Sequence[str], *, bos: str, pad: str | None, max_seq_len: int) -> None:
        self.vocab = list(vocab)
        self._ids = {token: i for i, token in enumerate(self.vocab)}
        self.bos_token, self.pad_token, self.max_seq_len = bos, pad, max_seq_len
        self.bos_token_id = self._ids[bos]
        self.pad_token_id = None if pad is None else self._ids[pad]

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        """Ids of the whitespace-separated tokens of ``text``; InvalidArgument on unknown tokens."""
        tokens = text.split()
        unknown = sorted({t for t in tokens if t not in self._ids})
        if unknown:
            raise InvalidArgument(
                f"tokens {unknown} are not in the tracr vocabulary {self.vocab}", field="tokens"
            )
        if not tokens or len(tokens) > self.max_seq_len:
            raise InvalidArgument(
                f"a tracr input has 1 to {self.max_seq_len} tokens (BOS included), not {len(tokens)}",
                field="tokens",
            )
        return [self._ids[t] for t in tokens]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """The space-separated tokens of ``ids``."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if any(not 0 <= i < len(self.vocab) for i in ids):
            raise InvalidArgument(f"token ids must lie in [0, {len(self.vocab)})", field="ids")
        return " ".join(self.vocab[i] for i in ids)


def _load_arrays(path: Path, config: TracrConfig) -> dict[str, np.ndarray]:
    """Read model.npz without pickles and check every array's name, dtype, shape and finiteness."""
    if not zipfile.is_zipfile(path):
        raise InvalidArgument(f"{path} is not an .npz (zip) archive", field="model.npz")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except ValueError as exc:  # object arrays need pickle, which is refused
        raise InvalidArgument(f"{path} holds pickled (object) arrays, which are refused",
                              field="model.npz") from exc
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise InvalidArgument(f"{path} is not a readable .npz file: {exc}", field="model.npz") from exc
    expected = config.array_shapes()
    missing, extra = sorted(expected.keys() - arrays.keys()), sorted(arrays.keys() - expected.keys())
    if missing or extra:
        raise InvalidArgument(f"model.npz arrays do not match the config: missing {missing}, "
                              f"unexpected {extra}", field="model.npz")
    for name, shape in expected.items():
        array = arrays[name]
        if array.dtype != np.float32:
            raise InvalidArgument(f"array {name} is {array.dtype}, not float32",
                                  field=f"model.npz:{name}")
        if array.shape != shape:
            raise InvalidArgument(f"array {name} has shape {array.shape}; the config implies {shape}",
                                  field=f"model.npz:{name}")
        if not np.isfinite(array).all():
            raise InvalidArgument(f"array {name} holds non-finite values", field=f"model.npz:{name}")
    return arrays


def load_tracr(directory: str | Path) -> tuple[TracrModel, TracrTokenizer]:
    """Load a ``tracr-npz/1`` export folder: the model (eval mode, float32, CPU) and its tokenizer."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelNotFound(f"no tracr model folder at {directory}")
    config_path, npz_path = directory / "config.json", directory / "model.npz"
    for path in (config_path, npz_path):
        if not path.is_file():
            raise InvalidArgument(f"{directory} is not a {FORMAT} export: {path.name} is missing",
                                  field=path.name)
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"{config_path} is not valid JSON: {exc}", field="config.json") from exc
    config = TracrConfig.from_json(raw)
    model = TracrModel(config)
    model.load_arrays(_load_arrays(npz_path, config))
    tokenizer = TracrTokenizer(config.input_vocab, bos=config.bos, pad=config.pad,
                               max_seq_len=config.max_seq_len)
    return model.eval(), tokenizer


__all__ = ["FORMAT", "TracrConfig", "TracrModel", "TracrTokenizer", "load_tracr"]
