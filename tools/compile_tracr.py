"""Compile RASP programs with tracr and export them in the ``tracr-npz/1`` format.

This script is the only place that needs JAX; the exports it writes under
``tests/fixtures/tracr/<name>/`` are committed, and the engine and the tests read them with
NumPy and PyTorch alone. To regenerate the fixtures, use a separate virtual environment
outside the repository:

    python3 -m venv ~/tracr-venv
    ~/tracr-venv/bin/pip install jax==0.10.2 jaxlib==0.10.2 dm-haiku==0.0.17 tracr-pypi==1.0.0
    ~/tracr-venv/bin/python tools/compile_tracr.py            # all programs
    ~/tracr-venv/bin/python tools/compile_tracr.py reverse    # one program

Each export is a folder with three files:

``model.npz``
    float32 arrays: ``tok_embed`` [n_in, D]; ``pos_embed`` [max_seq_len, D] (row 0 is the BOS
    position, which tracr leaves at zero); ``unembed`` [D, n_out]; and per layer l
    ``layers.{l}.attn.{q,k,v}.{w,b}`` ([D, H*key_size], [H*key_size]),
    ``layers.{l}.attn.o.{w,b}`` ([H*key_size, D], [D]),
    ``layers.{l}.mlp.fc_in.{w,b}`` ([D, hidden], [hidden]), ``layers.{l}.mlp.fc_out.{w,b}``
    ([hidden, D], [D]). Weights act on row vectors (``y = x @ w + b``), as in tracr.
``config.json``
    ``format`` "tracr-npz/1", the shapes, ``activation`` "relu", ``causal`` false,
    ``layer_norm`` false, ``input_vocab`` (token strings in id order, with ``bos`` and ``pad``),
    ``output_vocab`` (unembed columns in order), ``bos``, ``pad``, ``max_seq_len`` (including
    BOS) and ``output_encoding``: "categorical" (the answer is the argmax over
    ``output_vocab``) or "numerical" (one unembed column that reads the program's numerical
    output dimension off the residual stream; ``output_vocab`` is then the program's name).
``reference.json``
    What tracr itself computes for a few inputs, so tests without JAX can check that our
    PyTorch model reproduces it: per input the token string, tracr's decoded output (strings
    for categorical programs, floats for numerical ones; position 0 is the BOS token),
    ``logits`` [T, n_out] (the final residual times ``unembed``, before tracr's argmax) and
    ``residual`` [T, D] (tracr's final residual stream); plus tracr's residual basis labels,
    which name what each residual dimension means.

Tracr's compiled models have no layer norm, attend over every position (no causal mask; the
BOS token is always attended so that a query whose selector matches nothing reads BOS), use
q·k / sqrt(key_size) attention logits, ReLU MLPs (categorical lookup tables and numerical
discretising MLPs alike) and a residual stream that is the sum of the embeddings and every
attention and MLP output. Layers that tracr leaves empty hold zero weights; heads are padded
with zeros to the widest layer.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

import haiku as hk
import jax.numpy as jnp
import numpy as np
from tracr.compiler import compiling, lib
from tracr.rasp import rasp

FORMAT = "tracr-npz/1"
BOS = "BOS"
PAD = "PAD"
FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tracr"


@dataclass(frozen=True)
class Program:
    """A RASP program to compile, with its vocabulary and the inputs recorded as references."""

    make: Callable[[], rasp.SOp]
    vocab: frozenset
    max_seq_len: int  # tracr's max_seq_len, without BOS
    inputs: tuple[tuple, ...]


def _xproportion() -> rasp.SOp:
    """Fraction of the tokens so far that are "x" (numerical output), as in the Edge Pruning paper."""
    return lib.make_frac_prevs(rasp.tokens == "x").named("xproportion")


def _pattern() -> rasp.SOp:
    """True where "abc" ends; two shift_by heads (by 1 and by 2) run in the same layer."""
    return lib.detect_pattern(rasp.tokens, "abc").named("pattern")


def _hist() -> rasp.SOp:
    """How often each position's token occurs (tracr's ``make_hist``): one SelectorWidth, i.e. a
    near-hard attention to BOS feeding a step-function MLP that turns 1/(width+1) into a count."""
    return lib.make_hist().named("hist")


def _sort() -> rasp.SOp:
    """The tokens in ascending order (tracr's ``make_sort``, ties broken by position): a lookup MLP
    making the keys unique, a SelectorWidth counting the smaller keys, and a head moving each
    token to its rank."""
    return lib.make_sort(rasp.tokens, rasp.tokens, max_seq_len=4, min_key=1).named("sort")


def _lookup() -> rasp.SOp:
    """A chain of two categorical lookup MLPs (a Map of a Map, kept apart with ``simplify=False``)
    feeding one layer of two heads whose outputs one more lookup MLP combines.

    Both heads always select exactly one position (one the previous position, or position 0 for
    the first token; the other position 0), so every output is defined and no answer is a tie.
    """
    first = rasp.Map(lambda x: (2 * x + 1) % 3, rasp.tokens).named("first")
    second = rasp.Map(lambda x: (x + 2) % 3, first, simplify=False).named("second")
    previous = rasp.Aggregate(
        rasp.Select(rasp.indices, rasp.indices, lambda k, q: k == max(q - 1, 0)), second,
    ).named("previous")
    start = rasp.Aggregate(
        rasp.Select(rasp.indices, rasp.indices, lambda k, q: k == 0), second,
    ).named("start")
    return rasp.SequenceMap(lambda a, b: (a + 2 * b) % 3, previous, start).named("lookup")


PROGRAMS: dict[str, Program] = {
    "reverse": Program(
        make=lambda: lib.make_reverse(rasp.tokens).named("reverse"),
        vocab=frozenset({1, 2, 3}),
        max_seq_len=5,
        inputs=((1, 2, 3), (3, 1, 2, 2), (1, 1, 3, 2, 3), (2,), (3, 3)),
    ),
    "xproportion": Program(
        make=_xproportion,
        vocab=frozenset({"x", "y", "z"}),
        max_seq_len=5,
        inputs=(("x", "y", "x"), ("y", "y", "z", "x", "x"), ("x",), ("z", "x", "y", "y")),
    ),
    "pattern": Program(
        make=_pattern,
        vocab=frozenset({"a", "b", "c"}),
        max_seq_len=5,
        inputs=(("a", "b", "c"), ("c", "a", "b", "c", "a"), ("a", "b", "c", "a", "b"), ("b",)),
    ),
    "hist": Program(
        make=_hist,
        vocab=frozenset({"a", "b", "c"}),
        max_seq_len=5,
        inputs=(("a", "b", "a"), ("c", "c", "c", "b", "c"), ("b",), ("a", "b", "c", "a")),
    ),
    "sort": Program(
        make=_sort,
        vocab=frozenset({1, 2, 3}),
        max_seq_len=4,
        inputs=((3, 1, 2), (2, 2, 1, 3), (1,), (3, 3, 1, 1)),
    ),
    "lookup": Program(
        make=_lookup,
        vocab=frozenset({0, 1, 2}),
        max_seq_len=4,
        inputs=((0, 1, 2), (2, 2, 1, 0), (1,), (0, 0, 2, 1)),
    ),
}


def _unembed_matrix(model, d_model: int) -> np.ndarray:
    """Tracr's residual-to-output projection [D, n_out], read by unembedding the identity."""

    @hk.without_apply_rng
    @hk.transform
    def unembed(x):
        return model.get_compiled_model().unembed(x, use_unembed_argmax=False)

    out = np.asarray(unembed.apply({}, jnp.eye(d_model)[None]))[0]  # [D, n_out] or [D]
    return out.reshape(d_model, -1).astype(np.float32)


def _arrays(model, unembed: np.ndarray) -> dict[str, np.ndarray]:
    """Tracr's haiku parameters renamed into the tracr-npz/1 layout, as float32."""
    params = model.params
    arrays = {
        "tok_embed": params["token_embed"]["embeddings"],
        "pos_embed": params["pos_embed"]["embeddings"],
        "unembed": unembed,
    }
    names = {"attn/query": "attn.q", "attn/key": "attn.k", "attn/value": "attn.v",
             "attn/linear": "attn.o", "mlp/linear_1": "mlp.fc_in", "mlp/linear_2": "mlp.fc_out"}
    for layer in range(model.model_config.num_layers):
        for theirs, ours in names.items():
            p = params[f"transformer/layer_{layer}/{theirs}"]
            arrays[f"layers.{layer}.{ours}.w"] = p["w"]
            arrays[f"layers.{layer}.{ours}.b"] = p["b"]
    return {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}


def _vocab(encoding_map: dict) -> list[str]:
    """Token strings in id order."""
    return [str(v) for v, _ in sorted(encoding_map.items(), key=lambda item: item[1])]


def export(name: str, program: Program, out_dir: pathlib.Path) -> None:
    """Compile one program and write its model.npz, config.json and reference.json."""
    sop = program.make()
    model = compiling.compile_rasp_to_model(
        sop, vocab=set(program.vocab), max_seq_len=program.max_seq_len,
        compiler_bos=BOS, compiler_pad=PAD,
    )
    cfg = model.model_config
    d_model = len(model.residual_labels)
    numerical = not rasp.is_categorical(sop)
    unembed = _unembed_matrix(model, d_model)
    arrays = _arrays(model, unembed)
    config = {
        "format": FORMAT,
        "name": name,
        "num_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "key_size": cfg.key_size,
        "mlp_hidden_size": cfg.mlp_hidden_size,
        "d_model": d_model,
        "activation": "relu",
        "causal": bool(cfg.causal),
        "layer_norm": bool(cfg.layer_norm),
        "input_vocab": _vocab(model.input_encoder.encoding_map),
        "output_vocab": [name] if numerical else _vocab(model.output_encoder.encoding_map),
        "output_encoding": "numerical" if numerical else "categorical",
        "bos": BOS,
        "pad": PAD,
        "max_seq_len": program.max_seq_len + 1,
    }
    cases = []
    for tokens in program.inputs:
        out = model.apply([BOS, *tokens])
        residual = np.asarray(out.transformer_output[0], dtype=np.float32)  # [T, D]
        decoded = [BOS] + [float(v) if numerical else str(v) for v in out.decoded[1:]]
        cases.append({
            "input": " ".join(str(t) for t in [BOS, *tokens]),
            "decoded": decoded,
            "logits": (residual @ unembed).tolist(),  # [T, n_out]
            "residual": residual.tolist(),  # [T, D]
        })
    reference = {"program": name, "residual_labels": list(model.residual_labels), "cases": cases}

    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_dir / "model.npz", **arrays)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "reference.json").write_text(json.dumps(reference) + "\n")
    print(f"{name}: {cfg.num_layers} layers, {cfg.num_heads} heads, d_model {d_model} -> {out_dir}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("programs", nargs="*", metavar="PROGRAM",
                        help=f"programs to compile, of {', '.join(PROGRAMS)} (default: all)")
    parser.add_argument("--out", type=pathlib.Path, default=FIXTURES, help="output folder")
    args = parser.parse_args(argv)
    if unknown := set(args.programs) - set(PROGRAMS):
        parser.error(f"unknown programs {sorted(unknown)}; known: {', '.join(PROGRAMS)}")
    for name in args.programs or list(PROGRAMS):
        export(name, PROGRAMS[name], args.out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
