"""load_model: every reference kind, frozen weights, dtype and device, and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BertConfig, BertForMaskedLM

from edgeprune.engine.errors import (
    InvalidArgument,
    ModelNotFound,
    NotSupported,
    UnsupportedArchitecture,
)
from edgeprune.engine.loading import (
    cache_root,
    load_model,
    load_module,
    parse_ref,
    smollm2_gguf,
)
from edgeprune.engine.masked import CircuitModel
from edgeprune.engine.tracr_model import TracrModel, TracrTokenizer
from tests.tiny_models import tiny_llama

TRACR = Path(__file__).resolve().parent.parent / "fixtures" / "tracr"


def assert_frozen(model: CircuitModel, dtype: torch.dtype = torch.float32) -> None:
    params = list(model.module.parameters())
    assert params and all(not p.requires_grad for p in params)
    assert all(p.dtype == dtype for p in params)
    assert not model.module.training


@pytest.mark.parametrize(
    "ref",
    ["", "  ", " hf:x", "gpt2", "smollm2", "hf:", "tracr:", "tracr: ", "onnx:/tmp/m", None, 3],
)
def test_malformed_references(ref: object) -> None:
    with pytest.raises(InvalidArgument) as err:
        load_model(ref)  # type: ignore[arg-type]
    assert err.value.field == "model"


def test_parse_ref() -> None:
    assert parse_ref("smollm2-135m").kind == "smollm2"
    assert (parse_ref("hf:org/name").kind, parse_ref("hf:org/name").target) == ("hf", "org/name")
    assert parse_ref("tracr:/a/b:c").target == "/a/b:c"


def test_hf_gpt2_folder(tiny_gpt2_dir: Path) -> None:
    ref = f"hf:{tiny_gpt2_dir}"
    model = load_model(ref)
    assert isinstance(model, CircuitModel)
    assert (model.arch, model.name, model.n_layers) == ("gpt2", ref, 2)
    assert_frozen(model)
    # The module is the checkpoint itself: same logits as loading it with transformers directly.
    plain = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    ids = torch.tensor([model.tokenizer.encode(" When Mary and John went to the store")])  # [1, T]
    with torch.no_grad():
        torch.testing.assert_close(model.reference_logits(ids), plain(ids).logits)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_hf_llama_family_folders(kind: str, tmp_path: Path) -> None:
    folder = tiny_llama(tmp_path / kind, kind=kind)
    model = load_model(f"hf:{folder}")
    assert (model.arch, model.n_heads, model.n_kv_heads) == (kind, 4, 2)
    assert_frozen(model)
    assert model.tokenizer.padding_side == "right" and model.tokenizer.pad_token is not None


def test_hf_id_in_the_local_cache(tiny_gpt2_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """An id resolves against the local Hugging Face cache; nothing is downloaded."""
    repo = tmp_path / "hub" / "models--tiny--gpt2"
    shutil.copytree(tiny_gpt2_dir, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert load_model("hf:tiny/gpt2").arch == "gpt2"
    with pytest.raises(ModelNotFound):
        load_model("hf:tiny/not-there")


def test_dtype_and_device(tiny_gpt2_dir: Path) -> None:
    assert_frozen(load_model(f"hf:{tiny_gpt2_dir}", dtype=torch.bfloat16), torch.bfloat16)
    assert_frozen(load_model(f"hf:{tiny_gpt2_dir}", dtype="float16"), torch.float16)
    with pytest.raises(InvalidArgument) as err:
        load_model(f"hf:{tiny_gpt2_dir}", dtype=torch.int8)
    assert err.value.field == "dtype"
    with pytest.raises(InvalidArgument) as err:
        load_model(f"hf:{tiny_gpt2_dir}", device="toaster")
    assert err.value.field == "device"
    if not torch.cuda.is_available():
        with pytest.raises(NotSupported):
            load_model(f"hf:{tiny_gpt2_dir}", device="cuda")


def test_missing_models(tmp_path: Path) -> None:
    for ref in (f"hf:{tmp_path / 'nowhere'}", "hf:./nowhere", "hf:nobody/no-model", "hf:a b",
                f"tracr:{tmp_path / 'nowhere'}"):
        with pytest.raises(ModelNotFound):
            load_model(ref)
    with pytest.raises(ModelNotFound):  # a folder that holds no checkpoint
        load_model(f"hf:{tmp_path}")


def test_unsupported_architectures(tmp_path: Path) -> None:
    bert = tmp_path / "bert"
    BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=32)).save_pretrained(bert)
    with pytest.raises(UnsupportedArchitecture, match="bert.*supported.*LlamaForCausalLM"):
        load_model(f"hf:{bert}")
    exotic = tmp_path / "exotic"
    exotic.mkdir()
    (exotic / "config.json").write_text(json.dumps({"model_type": "my-own", "auto_map": {}}))
    with pytest.raises(UnsupportedArchitecture, match="my-own"):
        load_model(f"hf:{exotic}")


def test_only_complete_safetensors_checkpoints(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    pickled = Path(shutil.copytree(tiny_gpt2_dir, tmp_path / "pickled"))
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(ModelNotFound, match="safetensors"):
        load_model(f"hf:{pickled}")

    partial = Path(shutil.copytree(tiny_gpt2_dir, tmp_path / "partial"))
    weights = load_file(partial / "model.safetensors")
    weights.pop(next(k for k in weights if k.endswith("mlp.c_fc.weight")))
    save_file(weights, partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InvalidArgument, match="c_fc") as err:
        load_model(f"hf:{partial}")
    assert err.value.field == "model"

    bad_json = Path(shutil.copytree(tiny_gpt2_dir, tmp_path / "bad-json"))
    (bad_json / "config.json").write_text("{")
    with pytest.raises(InvalidArgument) as err:
        load_model(f"hf:{bad_json}")
    assert err.value.field == "model"


def test_missing_tokenizer(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_gpt2_dir / name, bare / name)
    with pytest.raises(ModelNotFound, match="tokenizer"):
        load_model(f"hf:{bare}")


def test_tracr_reference() -> None:
    module, tokenizer = load_module(f"tracr:{TRACR / 'reverse'}")
    assert isinstance(module, TracrModel) and isinstance(tokenizer, TracrTokenizer)
    model = load_model(f"tracr:{TRACR / 'pattern'}")
    assert (model.arch, model.n_layers, model.n_heads) == ("tracr", 3, 2)
    assert model.graph.writers[:2] == ("tok", "pos")
    assert_frozen(model)


def test_cache_root(tmp_path: Path, monkeypatch) -> None:
    assert cache_root(tmp_path) == tmp_path
    monkeypatch.setenv("EDGEPRUNE_CACHE_DIR", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    monkeypatch.delenv("EDGEPRUNE_CACHE_DIR")
    assert cache_root() == Path.home() / ".cache" / "edgeprune"


def test_smollm2_gguf_ships_with_the_package() -> None:
    path = smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


def test_smollm2_reads_a_complete_cache_without_converting(tmp_path: Path) -> None:
    """A cache folder stamped with the installed GGUF file is loaded as it is (here a tiny LLaMA
    stands in for the converted weights, so no 20 s conversion runs)."""
    gguf = smollm2_gguf()
    cached = tiny_llama(tmp_path / "smollm2-135m")
    (cached / "source.json").write_text(json.dumps({"gguf": gguf.name, "bytes": gguf.stat().st_size}))
    model = load_model("smollm2-135m", cache_dir=tmp_path)
    assert (model.name, model.arch, model.d_model) == ("smollm2-135m", "llama", 32)



def test_load_model_is_exported_by_the_engine() -> None:
    import edgeprune.engine

    assert edgeprune.engine.load_model is load_model
