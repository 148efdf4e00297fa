"""The package layout in pyproject.toml covers every Python package folder, so a wheel (the
Docker image installs one) holds the same modules as the editable checkout the tests run on."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_folder_is_listed() -> None:
    config = _setuptools()
    listed = set(config["packages"])
    for name, folder in config["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            dotted = ".".join([name, *rel.parts]) if rel.parts else name
            assert dotted in listed, f"{dotted} ({init.parent}) is missing from [tool.setuptools] packages"


def test_listed_packages_exist() -> None:
    config = _setuptools()
    mapping = config["package-dir"]
    for package in config["packages"]:
        top = max((n for n in mapping if package == n or package.startswith(n + ".")), key=len)
        folder = ROOT / mapping[top] / Path(*package[len(top) :].lstrip(".").split(".") if package != top else ())
        assert (folder / "__init__.py").is_file(), f"{package} -> {folder} has no __init__.py"


# ---- dependency floors ---------------------------------------------------------------------------

GEN = ROOT / "protos" / "gen" / "edgeprune" / "v1"
# Packages whose version must reach the gRPC code generator's: the runtime the stubs import, the
# generator itself (make protos-check compares its output) and the server's gRPC add-ons, which
# require a grpcio of their own version.
GRPC_PACKAGES = ("grpcio", "grpcio-tools", "grpcio-health-checking", "grpcio-reflection",
                 "grpcio-status")


def _floors() -> dict[str, Version]:
    """Lowest version pyproject.toml allows for each dependency (base and every extra)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values()
                                          for r in extra)]
    floors = {}
    for line in listed:
        requirement = Requirement(line)
        lows = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==", "~=")]
        if lows:
            floors[canonicalize_name(requirement.name)] = max(lows)
    return floors


def _generated_versions() -> tuple[Version, Version]:
    """(protobuf gencode version, grpc generated version): the highest any stub demands."""
    protobuf, grpc = [], []
    for path in GEN.glob("*_pb2.py"):
        match = re.search(r"ValidateProtobufRuntimeVersion\(\s*[\w.]+,\s*(\d+),\s*(\d+),\s*(\d+),",
                          path.read_text())
        assert match, f"{path.name} has no protobuf runtime version check"
        protobuf.append(Version(".".join(match.groups())))
    for path in GEN.glob("*_pb2_grpc.py"):
        match = re.search(r"^GRPC_GENERATED_VERSION = '([\d.]+)'$", path.read_text(), re.MULTILINE)
        assert match, f"{path.name} has no GRPC_GENERATED_VERSION"
        grpc.append(Version(match[1]))
    assert protobuf and grpc
    return max(protobuf), max(grpc)


def test_dependency_floors_reach_the_generated_stubs_versions() -> None:
    """pip must never install a protobuf or grpcio that the stubs refuse at import time."""
    protobuf, grpc = _generated_versions()
    floors = _floors()
    assert floors["protobuf"] >= protobuf, (
        f"pyproject allows protobuf {floors['protobuf']}; the stubs need {protobuf}")
    for name in GRPC_PACKAGES:
        assert floors[name] >= grpc, f"pyproject allows {name} {floors[name]}; the stubs need {grpc}"


# ---- the engine's public names --------------------------------------------------------------------


def test_engine_exports_the_functions_not_their_modules() -> None:
    """`from edgeprune.engine import prune, sweep` gives the functions even after (as in any
    real program) the modules of the same names were imported; a fresh interpreter, so nothing
    this test session imported decides it."""
    script = (
        "import edgeprune.engine.prune, edgeprune.engine.sweep\n"
        "from edgeprune.engine import prune, sweep, PruneConfig, load_model\n"
        "from edgeprune.engine.prune import prune as prune_function\n"
        "from edgeprune.engine.sweep import sweep as sweep_function, cpr\n"
        "import edgeprune.engine as engine\n"
        "assert prune is prune_function and sweep is sweep_function, (prune, sweep)\n"
        "assert engine.prune is prune and engine.sweep is sweep\n"
        "assert callable(cpr) and PruneConfig.__name__ == 'PruneConfig'\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
