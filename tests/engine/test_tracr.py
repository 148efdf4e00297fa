"""Tracr models in PyTorch reproduce tracr's own outputs, and bad exports fail clearly.

The fixtures under tests/fixtures/tracr/ were compiled with tracr by tools/compile_tracr.py; each
``reference.json`` holds tracr's decoded outputs, logits and final residual stream for a few inputs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeprune.engine.errors import InvalidArgument, ModelNotFound
from edgeprune.engine.masked import CircuitModel
from edgeprune.engine.tracr_model import TracrModel, TracrTokenizer, load_tracr

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "tracr"
PROGRAMS = ("reverse", "xproportion", "pattern", "hist", "sort", "lookup")


def reference(program: str) -> list[dict]:
    return json.loads((FIXTURES / program / "reference.json").read_text())["cases"]


def padded_batch(tokenizer: TracrTokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] and attention mask [B, T]."""
    encoded = [tokenizer.encode(t) for t in texts]
    T = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), T), tokenizer.pad_token_id)  # [B, T]
    mask = torch.zeros(len(encoded), T, dtype=torch.long)  # [B, T]
    for i, e in enumerate(encoded):
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    return ids, mask


def assert_decodes_like_tracr(model: TracrModel, logits: torch.Tensor, case: dict) -> int:
    """Our decoding of logits [T, V] equals tracr's wherever tracr's answer is defined.

    Returns the number of positions compared.
    Position 0 is BOS (tracr writes the BOS token there). Where tracr's own logits tie (a RASP
    value of None, e.g. the first positions of a shifted sequence), its argmax is arbitrary.
    """
    ours, theirs = model.decode_logits(logits)[1:], case["decoded"][1:]
    ref = torch.tensor(case["logits"])[1:]  # [T-1, V]
    if model.config.output_encoding == "numerical":
        assert ours == pytest.approx(theirs, abs=1e-5)
        return len(ours)
    top2 = ref.topk(2, dim=-1).values  # [T-1, 2]
    defined = torch.nonzero(top2[:, 0] - top2[:, 1] > 0.5).flatten().tolist()
    for pos in defined:
        assert ours[pos] == theirs[pos], (case["input"], pos)
    return len(defined)


@pytest.mark.parametrize("program", PROGRAMS)
def test_model_reproduces_tracr_outputs(program: str) -> None:
    model, tokenizer = load_tracr(FIXTURES / program)
    residuals: list[torch.Tensor] = []
    model.unembed.register_forward_pre_hook(lambda _mod, args: residuals.append(args[0]))
    compared = 0
    for case in reference(program):
        ids = torch.tensor([tokenizer.encode(case["input"])])  # [1, T]
        with torch.no_grad():
            logits = model(ids)[0]  # [T, V]
        torch.testing.assert_close(logits, torch.tensor(case["logits"]), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(residuals[-1][0], torch.tensor(case["residual"]), atol=1e-4, rtol=1e-4)
        compared += assert_decodes_like_tracr(model, logits, case)
    assert compared >= 6


@pytest.mark.parametrize("program", PROGRAMS)
def test_padded_batch_matches_single_runs(program: str) -> None:
    model, tokenizer = load_tracr(FIXTURES / program)
    cases = reference(program)
    ids, mask = padded_batch(tokenizer, [c["input"] for c in cases])
    with torch.no_grad():
        logits = model(ids, attention_mask=mask)  # [B, T, V]
    for i, case in enumerate(cases):
        n = len(case["logits"])
        torch.testing.assert_close(logits[i, :n], torch.tensor(case["logits"]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("program", PROGRAMS)
def test_circuit_model_with_all_masks_one_reproduces_tracr(program: str) -> None:
    model, tokenizer = load_tracr(FIXTURES / program)
    circuit = CircuitModel(model, tokenizer)
    cases = reference(program)
    ids, mask = padded_batch(tokenizer, [c["input"] for c in cases])
    ones = torch.ones(circuit.graph.n_edges)
    with torch.no_grad():
        logits = circuit.logits(ids, attention_mask=mask, edge_mask=ones, ablation="zero")  # [B, T, V]
    compared = 0
    for i, case in enumerate(cases):
        n = len(case["logits"])
        torch.testing.assert_close(logits[i, :n], torch.tensor(case["logits"]), atol=1e-4, rtol=1e-4)
        compared += assert_decodes_like_tracr(model, logits[i, :n], case)
    assert compared >= 6


@pytest.mark.parametrize("program", PROGRAMS)
def test_circuit_model_with_all_masks_zero_reproduces_the_corrupted_run(program: str) -> None:
    model, tokenizer = load_tracr(FIXTURES / program)
    circuit = CircuitModel(model, tokenizer)
    texts = [c["input"] for c in reference(program)]
    ids, mask = padded_batch(tokenizer, texts)
    # The corrupted input of each example: its tokens after BOS in reverse order (same length).
    flipped = [" ".join(["BOS", *reversed(t.split()[1:])]) for t in texts]
    corrupted, _ = padded_batch(tokenizer, flipped)
    with torch.no_grad():
        logits = circuit.logits(ids, attention_mask=mask, corrupted_ids=corrupted,
                                edge_mask=torch.zeros(circuit.graph.n_edges))  # [B, T, V]
        expected = model(corrupted, attention_mask=mask)  # [B, T, V]
    valid = mask.bool()
    torch.testing.assert_close(logits[valid], expected[valid], atol=1e-4, rtol=1e-4)


def test_fixture_shapes() -> None:
    """reverse and xproportion as in the paper; pattern has a layer with two working heads."""
    reverse, _ = load_tracr(FIXTURES / "reverse")
    assert reverse.config.output_encoding == "categorical"
    assert reverse.config.output_vocab == ("1", "2", "3")
    xprop, _ = load_tracr(FIXTURES / "xproportion")
    assert xprop.config.output_encoding == "numerical" and xprop.config.output_vocab == (
        "xproportion",
    )
    pattern, _ = load_tracr(FIXTURES / "pattern")
    assert pattern.config.num_heads == 2
    K = pattern.config.key_size
    live = [
        [bool(layer.attn.q.weight[h * K : (h + 1) * K].abs().sum() > 0) for h in range(2)]
        for layer in pattern.layers
    ]
    assert [True, True] in live
    for model in (reverse, xprop, pattern):
        assert model.config.max_seq_len == 6 and model.config.bos == "BOS"
        assert all(p.dtype == torch.float32 for p in model.parameters())


def test_tokenizer_round_trip_and_errors() -> None:
    _, tokenizer = load_tracr(FIXTURES / "reverse")
    ids = tokenizer.encode("BOS 1 3 2")
    assert ids == [tokenizer.vocab.index(t) for t in ("BOS", "1", "3", "2")]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids) == "BOS 1 3 2"
    assert tokenizer.decode(torch.tensor(ids)) == "BOS 1 3 2"
    with pytest.raises(InvalidArgument, match=r"\['4', 'x'\]") as err:
        tokenizer.encode("BOS 1 4 x")
    assert err.value.field == "tokens"
    with pytest.raises(InvalidArgument, match="at most|1 to 6") as err:
        tokenizer.encode("BOS 1 2 3 1 2 3")
    assert err.value.field == "tokens"
    with pytest.raises(InvalidArgument):
        tokenizer.encode("   ")
    with pytest.raises(InvalidArgument):
        tokenizer.decode([99])


def test_bad_input_ids_are_refused_by_the_model() -> None:
    model, _ = load_tracr(FIXTURES / "reverse")
    with pytest.raises(InvalidArgument, match="at most 6") as err:
        model(torch.zeros(1, 7, dtype=torch.long))
    assert err.value.field == "input_ids"
    with pytest.raises(InvalidArgument, match=r"\[0, 5\)") as err:
        model(torch.tensor([[0, 5]]))
    assert err.value.field == "input_ids"


# --- malformed exports ------------------------------------------------------------------------


@pytest.fixture
def export(tmp_path: Path) -> Path:
    """A writable copy of the reverse export."""
    return Path(shutil.copytree(FIXTURES / "reverse", tmp_path / "reverse"))


def edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def edit_arrays(folder: Path, **changes: np.ndarray | None) -> None:
    with np.load(folder / "model.npz") as npz:
        arrays = dict(npz)
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    np.savez(folder / "model.npz", **arrays)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"format": "tracr-npz/2"}, "config.json:format"),
        ({"format": None}, "config.json:format"),
        ({"num_heads": 0}, "config.json:num_heads"),
        ({"key_size": "12"}, "config.json:key_size"),
        ({"d_model": None}, "config.json:d_model"),
        ({"activation": "gelu"}, "config.json:activation"),
        ({"layer_norm": True}, "config.json:layer_norm"),
        ({"causal": "no"}, "config.json:causal"),
        ({"input_vocab": ["BOS", "1", "1"]}, "config.json:input_vocab"),
        ({"input_vocab": ["BOS", "a b"]}, "config.json:input_vocab"),
        ({"output_vocab": []}, "config.json:output_vocab"),
        ({"bos": "<s>"}, "config.json:bos"),
        ({"pad": "<pad>"}, "config.json:pad"),
        ({"output_encoding": "binary"}, "config.json:output_encoding"),
        ({"output_encoding": "numerical"}, "config.json:output_vocab"),
        ({"num_layers": 5}, "model.npz"),  # arrays of layer 4 are missing
        ({"d_model": 40}, "model.npz:tok_embed"),
        ({"max_seq_len": 7}, "model.npz:pos_embed"),
    ],
)
def test_corrupt_config_is_refused(export: Path, changes: dict, field: str) -> None:
    edit_config(export, **changes)
    with pytest.raises(InvalidArgument) as err:
        load_tracr(export)
    assert err.value.field == field


def test_config_that_is_not_json_is_refused(export: Path) -> None:
    (export / "config.json").write_text("{not json")
    with pytest.raises(InvalidArgument, match="not valid JSON") as err:
        load_tracr(export)
    assert err.value.field == "config.json"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"unembed": None}, "model.npz"),
        ({"extra": np.zeros(3, dtype=np.float32)}, "model.npz"),
        ({"layers.0.attn.q.w": np.zeros((41, 12), dtype=np.float64)}, "model.npz:layers.0.attn.q.w"),
        ({"layers.1.mlp.fc_in.b": np.zeros(29, dtype=np.float32)}, "model.npz:layers.1.mlp.fc_in.b"),
        ({"layers.2.attn.o.b": np.full(41, np.nan, dtype=np.float32)}, "model.npz:layers.2.attn.o.b"),
    ],
)
def test_bad_arrays_are_refused(export: Path, changes: dict, field: str) -> None:
    edit_arrays(export, **changes)
    with pytest.raises(InvalidArgument) as err:
        load_tracr(export)
    assert err.value.field == field


def test_pickled_arrays_are_refused(export: Path) -> None:
    edit_arrays(export, tok_embed=np.array([{"payload": 1}], dtype=object))
    with pytest.raises(InvalidArgument, match="pickle") as err:
        load_tracr(export)
    assert err.value.field == "model.npz"


def test_npz_that_is_not_a_zip_is_refused(export: Path) -> None:
    (export / "model.npz").write_bytes(b"not a zip file")
    with pytest.raises(InvalidArgument) as err:
        load_tracr(export)
    assert err.value.field == "model.npz"


def test_missing_files_and_folders(export: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound):
        load_tracr(tmp_path / "nowhere")
    (export / "model.npz").unlink()
    with pytest.raises(InvalidArgument, match="model.npz is missing") as err:
        load_tracr(export)
    assert err.value.field == "model.npz"
