"""Model provisioning on a temporary model volume with the tiny checkpoints: what is there, what
is missing, recorded configs that disagree with the files, the default model's conversion done
once (its stamp written by an earlier conversion), and the volume's lock."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from edgeprune.engine.loading import DEFAULT_MODEL, SMOLLM2_GGUF, smollm2_gguf
from edgeprune.service.config import Config, load_config
from edgeprune.service.provision import provision, volume_lock


def converted_default_model(cache: Path) -> Path:
    """The default model's folder as a finished conversion leaves it (only its stamp matters to
    provisioning, which loads no weights); converting the real GGUF file takes about a minute."""
    folder = cache / DEFAULT_MODEL
    folder.mkdir(parents=True)
    gguf = smollm2_gguf()
    (folder / "source.json").write_text(json.dumps({"gguf": SMOLLM2_GGUF,
                                                    "bytes": gguf.stat().st_size}))
    return folder


def allow_list(tmp_path: Path, models: dict[str, object]) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"models": models}))
    return path


def config_of(path: Path) -> Config:
    return load_config(None, environ={"EDGEPRUNE_CONFIG": str(path)})


@pytest.fixture()
def volume(tmp_path: Path, tiny_gpt2_dir: Path, tiny_llama_dir: Path) -> dict[str, object]:
    """A model volume holding the default model, the tiny GPT-2 and LLaMA, and a GPT-2 folder
    without weights; the allow-list also names a folder and a hub id that are nowhere here."""
    cache = tmp_path / "models"
    converted_default_model(cache)
    hf = cache / "hf"
    for name, source in (("gpt2", tiny_gpt2_dir), ("llama", tiny_llama_dir)):
        shutil.copytree(source, hf / name)
    shutil.copytree(tiny_gpt2_dir, hf / "no-weights", ignore=shutil.ignore_patterns("*.safetensors"))
    llama_config = json.loads((hf / "llama" / "config.json").read_text())
    return {
        "default": DEFAULT_MODEL,
        "gpt2": {"ref": f"hf:{hf / 'gpt2'}",
                 "config": json.loads((hf / "gpt2" / "config.json").read_text())},
        "llama-stale": {"ref": f"hf:{hf / 'llama'}",  # recorded before the folder changed
                        "config": {**llama_config, "num_hidden_layers": 7}},
        "no-weights": f"hf:{hf / 'no-weights'}",
        "absent": f"hf:{cache / 'hf' / 'absent'}",
        "hub-id": "hf:nobody/not-in-the-local-cache",
    }


def test_each_model_is_present_missing_or_mismatched(tmp_path: Path,
                                                     volume: dict[str, object]) -> None:
    cache = tmp_path / "models"
    stamp = (cache / DEFAULT_MODEL / "source.json").stat().st_mtime_ns
    states = {s.name: s for s in provision(config_of(allow_list(tmp_path, volume)), cache)}
    assert {n: s.state for n, s in states.items()} == {
        "default": "present", "gpt2": "present", "llama-stale": "mismatch",
        "no-weights": "missing", "absent": "missing", "hub-id": "missing"}
    assert "n_layers 7 recorded, 2 in its config.json" in states["llama-stale"].detail
    assert "no safetensors weights" in states["no-weights"].detail
    assert "no model folder" in states["absent"].detail
    assert "not-in-the-local-cache" in states["hub-id"].detail
    # the conversion was done before: nothing is written again
    assert (cache / DEFAULT_MODEL / "source.json").stat().st_mtime_ns == stamp
    assert {p.name for p in cache.iterdir()} == {".provision.lock", DEFAULT_MODEL, "hf"}


def test_a_pass_with_every_model_there_is_ok(tmp_path: Path, volume: dict[str, object]) -> None:
    good = {k: v for k, v in volume.items() if k in ("default", "gpt2")}
    states = provision(config_of(allow_list(tmp_path, good)), tmp_path / "models")
    assert [(s.name, s.state, s.ok) for s in states] == [("default", "present", True),
                                                         ("gpt2", "present", True)]


def test_a_second_pass_waits_for_the_one_holding_the_volume(
        tmp_path: Path, volume: dict[str, object]) -> None:
    cache = tmp_path / "models"
    config = config_of(allow_list(tmp_path, {"gpt2": volume["gpt2"]}))
    done = threading.Event()
    with volume_lock(cache):  # another pod converting
        worker = threading.Thread(target=lambda: (provision(config, cache), done.set()))
        worker.start()
        assert not done.wait(0.5)
    worker.join(timeout=30)
    assert done.is_set()
