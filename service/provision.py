"""Model provisioning: make the model volume hold what the allow-list names, before workers start
(`python -m edgeprune.service provision-models`, the GPU workers' init container).

For every allow-listed reference it checks that the files a worker loads are there (config,
safetensors weights, tokenizer; nothing is ever downloaded: what is neither on the volume nor in
an installed package is reported missing), that the config the allow-list records for the
API's memory estimate (`Config.model_configs`) agrees with the model's own config.json, and
converts the default model's GGUF file into a safetensors folder under the cache folder
(``$EDGEPRUNE_CACHE_DIR``) once. The conversion is written to a temporary folder and renamed
into place with its ``source.json`` stamp (see `engine.loading`), and the whole pass holds a file
lock on the volume, so a pod that starts while another converts waits for it and then finds
everything done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edgeprune.engine import errors as engine_errors
from edgeprune.engine.loading import DEFAULT_MODEL, cache_root, check_model, convert_default_model
from edgeprune.engine.memory import ModelShape
from edgeprune.service.config import Config

LOCK_FILE = ".provision.lock"
OK_STATES = ("present", "converted")


@dataclass(frozen=True)
class ModelState:
    """What provisioning found for one allow-listed model."""

    name: str
    ref: str
    state: str  # present | converted | missing | mismatch | failed
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.state in OK_STATES

    def __str__(self) -> str:
        return f"{self.state:<9} {self.name} ({self.ref})" + (f": {self.detail}" if self.detail
                                                              else "")


@contextlib.contextmanager
def volume_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on the model volume, held by one provisioning pass at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _recorded_mismatch(config: Config, name: str, ref: str) -> str:
    """How the allow-list's recorded config of ``name`` differs from the model's config.json
    ("" when it records none, agrees, or the reference is not a local folder)."""
    recorded = config.model_configs.get(name)
    kind, _, target = ref.partition(":")
    if recorded is None or kind not in ("hf", "tracr") or not Path(target).is_dir():
        return ""
    actual = dataclasses.replace(ModelShape.from_config_file(target), name="")
    expected = dataclasses.replace(ModelShape.from_config(recorded), name="")
    differences = [f"{f.name} {getattr(expected, f.name)} recorded, {getattr(actual, f.name)} "
                   "in its config.json" for f in dataclasses.fields(ModelShape)
                   if getattr(expected, f.name) != getattr(actual, f.name)]
    return "; ".join(differences)


def provision_model(config: Config, name: str, ref: str, cache_dir: Path) -> ModelState:
    try:
        if ref == DEFAULT_MODEL:
            folder, converted = convert_default_model(cache_dir)
            return ModelState(name, ref, "converted" if converted else "present", str(folder))
        check_model(ref)
        mismatch = _recorded_mismatch(config, name, ref)
    except engine_errors.EngineError as err:
        return ModelState(name, ref, "missing", str(err))
    except OSError as err:  # e.g. the volume is full or read-only
        return ModelState(name, ref, "failed", f"{type(err).__name__}: {err}")
    if mismatch:
        return ModelState(name, ref, "mismatch", f"the allow-list's config: {mismatch}")
    return ModelState(name, ref, "present")


def provision(config: Config, cache_dir: str | os.PathLike | None = None) -> list[ModelState]:
    """Check (and convert where needed) every allow-listed model, under the volume's lock."""
    root = cache_root(cache_dir)
    with volume_lock(root):
        return [provision_model(config, name, ref, root)
                for name, ref in sorted(config.models.items())]
