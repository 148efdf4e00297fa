"""Configuration: flags > EDGEPRUNE_* environment > file > defaults, and clear errors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgeprune.service.cli import serve_main
from edgeprune.service.config import Config, ConfigError, add_arguments, load_config


def parse(argv: list[str], environ: dict[str, str] | None = None) -> Config:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return load_config(parser.parse_args(argv), environ=environ or {})


def test_defaults() -> None:
    config = parse([])
    assert config.port == 50051 and config.workers == 1
    assert config.models == {"smollm2-135m": "smollm2-135m"}
    assert config.database_url == "" and config.data_dir == "data"
    assert not config.tls and not config.auth_tokens


def test_precedence_flags_over_environment_over_file(tmp_path: Path) -> None:
    path = tmp_path / "edgeprune.yaml"
    path.write_text("port: 1111\nworkers: 3\nmetrics_port: 2222\n"
                    "models:\n  gpt2: hf:/models/gpt2\nlimits:\n  max_steps: 77\n")
    config = parse(["--config", str(path), "--port", "3333"],
                   {"EDGEPRUNE_PORT": "4444", "EDGEPRUNE_WORKERS": "2"})
    assert config.port == 3333  # flag
    assert config.workers == 2  # environment over file
    assert config.metrics_port == 2222  # file
    assert config.models == {"gpt2": "hf:/models/gpt2"}
    assert config.limits.max_steps == 77


def test_lists_and_mappings_from_every_source(tmp_path: Path) -> None:
    config = parse([], {"EDGEPRUNE_MODELS": "a=hf:/x, b=tracr:/y", "EDGEPRUNE_INSECURE": "1",
                        "EDGEPRUNE_AUTH_TOKENS": "t1,t2", "EDGEPRUNE_MAX_PAGE_SIZE": "10"})
    assert config.models == {"a": "hf:/x", "b": "tracr:/y"}
    assert config.auth_tokens == ("t1", "t2") and config.limits.max_page_size == 10
    config = parse(["--model", "c=hf:/z", "--auth-token", "t3", "--insecure"],
                   {"EDGEPRUNE_MODELS": "a=hf:/x"})
    assert config.models == {"c": "hf:/z"} and config.auth_tokens == ("t3",)
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"auth_tokens": ["t4"], "show_model_refs": False,
                                "insecure": True}))
    config = parse([], {"EDGEPRUNE_CONFIG": str(path)})
    assert config.auth_tokens == ("t4",) and config.show_model_refs is False


def test_round_trip_to_workers() -> None:
    config = parse(["--model", "c=hf:/z", "--auth-token", "t", "--insecure", "--max-steps", "5"])
    assert Config.from_json(config.to_json()) == config


@pytest.mark.parametrize(("argv", "environ", "message"), [
    (["--port", "abc"], {}, "port (from --port)"),
    ([], {"EDGEPRUNE_WORKERS": "-1"}, "workers"),
    (["--model", "noequals"], {}, "NAME=VALUE"),
    (["--model", "bad/name=hf:/x"], {}, "bad short name"),
    (["--tls-cert", "/nonexistent.pem"], {}, "tls_cert and tls_key"),
    (["--heartbeat-s", "60", "--lease-s", "30"], {}, "heartbeat_s"),
    (["--max-steps", "0"], {}, "max_steps"),
    ([], {"EDGEPRUNE_SHOW_MODEL_REFS": "maybe"}, "not a boolean"),
    (["--config", "/nonexistent.yaml"], {}, "/nonexistent.yaml"),
])
def test_bad_settings_are_named(argv: list[str], environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(argv, environ)


def test_unknown_file_settings(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("prot: 1\n")
    with pytest.raises(ConfigError, match="unknown settings prot"):
        parse(["--config", str(path)])


def test_serve_main_exits_2_on_a_bad_setting(capsys: pytest.CaptureFixture[str]) -> None:
    assert serve_main(["--port", "-5"]) == 2
    assert "port" in capsys.readouterr().err


def test_the_api_knows_the_engines_built_in_tasks() -> None:
    """The API checks task names without importing the engine; the lists must agree."""
    from edgeprune.engine.tasks import TASKS
    from edgeprune.service.validation import BUILTIN_TASKS, TRACR_TASK_PREFIX

    assert set(BUILTIN_TASKS) == {n for n in TASKS if not n.startswith(TRACR_TASK_PREFIX)}


def test_the_api_process_does_not_import_torch() -> None:
    code = ("import sys, edgeprune.service.server, edgeprune.service.cli; "
            "print('torch' in sys.modules or 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "False"


LLAMA_1B = {"model_type": "llama", "num_hidden_layers": 16, "num_attention_heads": 32,
            "num_key_value_heads": 8, "hidden_size": 2048, "intermediate_size": 8192,
            "vocab_size": 128256, "tie_word_embeddings": True}


def test_allow_list_entries_may_record_the_models_config(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"worker_dtype": "bfloat16", "models": {
        "small": "smollm2-135m", "big": {"ref": "hf:/absent/llama", "config": LLAMA_1B}}}))
    config = parse(["--config", str(path)])
    assert config.models == {"small": "smollm2-135m", "big": "hf:/absent/llama"}
    assert config.model_configs == {"big": LLAMA_1B} and config.worker_dtype == "bfloat16"
    assert Config.from_json(config.to_json()) == config
    # the recorded configs belong to the file's allow-list: one from elsewhere replaces both
    config = parse(["--config", str(path)], {"EDGEPRUNE_MODELS": "big=hf:/other"})
    assert config.models == {"big": "hf:/other"} and config.model_configs == {}
    # a whole config.json will do: only what the estimate reads is checked
    path.write_text(json.dumps({"models": {"big": {"ref": "hf:/absent/llama", "config": {
        **LLAMA_1B, "bos_token_id": 0, "rope_theta": 500000.0, "rms_norm_eps": 1e-5}}}}))
    assert parse(["--config", str(path)]).model_configs["big"]["bos_token_id"] == 0


@pytest.mark.parametrize(("entry", "message"), [
    ({"ref": "hf:/x", "config": {**LLAMA_1B, "model_type": "bert"}},
     "models.m.config.model_type: 'bert' is not one of .*gpt2, .*llama"),
    ({"ref": "hf:/x", "config": {**LLAMA_1B, "hidden_size": 0}},
     "models.m.config.hidden_size: must be a positive integer, got 0"),
    ({"ref": "hf:/x", "config": {**LLAMA_1B, "vocab_size": 1.5}},
     "models.m.config: vocab_size must be a positive integer, got 1.5"),
    ({"ref": "hf:/x", "config": {"model_type": "llama", "num_hidden_layers": 2}},
     "models.m.config: .*not given: .*hidden_size"),
    ({"ref": "hf:/x", "config": "llama"}, "models.m.config: expected a mapping"),
    ({"config": LLAMA_1B}, "models.m .*got no ref"),
    ({"ref": "hf:/x", "shape": {}}, "models.m .*got shape"),
])
def test_a_bad_recorded_config_is_named(tmp_path: Path, entry: dict, message: str) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"models": {"m": entry}}))
    with pytest.raises(ConfigError, match=message):
        parse(["--config", str(path)])


def test_worker_dtype_is_a_dtype_name() -> None:
    assert parse([]).worker_dtype == ""
    with pytest.raises(ConfigError, match="worker_dtype: 'bf16' is not one of float32, bfloat16"):
        parse(["--worker-dtype", "bf16"])
