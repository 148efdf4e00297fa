"""The package layout in pyproject.toml covers every Python package folder, so a wheel (the
Docker image installs one) holds the same modules as the editable checkout the tests run on."""

from __future__ import annotations

from pathlib import Path

import tomllib

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
