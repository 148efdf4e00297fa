"""The thin client works without the server side: torch, transformers and SQLAlchemy are
made unimportable (a meta-path blocker installed by a sitecustomize on PYTHONPATH) and the
client still imports, and `edgeprune --help` still runs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BLOCKED = ("torch", "transformers", "sqlalchemy", "alembic", "numpy", "matplotlib", "edgeprune.engine", "edgeprune.storage", "edgeprune.service")

# The thin install as pip leaves it: edgeprune.service is there, the server extra's packages not.
SERVER_EXTRA = ("torch", "transformers", "sqlalchemy", "alembic", "numpy", "matplotlib", "prometheus_client",
                "grpc_health", "grpc_reflection", "grpc_status", "psycopg")


def _sitecustomize(blocked: tuple[str, ...]) -> str:
    return SITECUSTOMIZE_TEMPLATE.replace("BLOCKED_NAMES", repr(blocked))


SITECUSTOMIZE_TEMPLATE = textwrap.dedent(
    """
    import sys

    BLOCKED = BLOCKED_NAMES

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ImportError(f"{name} is blocked by the import-guard test")
            return None

    sys.meta_path.insert(0, Blocker())
    """
)
SITECUSTOMIZE = _sitecustomize(BLOCKED)


@pytest.fixture(scope="module")
def guarded_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("guard")
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), env.get("PYTHONPATH")]))
    return env


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=False, env=env, capture_output=True, text=True, timeout=60)


def test_the_blocker_blocks(guarded_env: dict[str, str]) -> None:
    result = _run([sys.executable, "-c", "import sqlalchemy"], guarded_env)
    assert result.returncode != 0
    assert "blocked by the import-guard test" in result.stderr


def test_client_imports_without_server_dependencies(guarded_env: dict[str, str]) -> None:
    code = textwrap.dedent(
        """
        import sys
        import edgeprune.client as c
        from edgeprune.client import cli, demo, errors, progress
        cli.build_parser()
        client = c.Client("127.0.0.1:1")
        client.close()
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "sqlalchemy"))
        assert not heavy, heavy
        assert set(c.__all__) <= set(dir(c))
        print("ok")
        """
    )
    result = _run([sys.executable, "-c", code], guarded_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_cli_help_without_server_dependencies(guarded_env: dict[str, str]) -> None:
    script = Path(sys.executable).with_name("edgeprune")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "edgeprune.client.cli"]
    for args in (["--help"], ["submit", "--help"], ["circuits", "show", "--help"], ["demo", "--help"]):
        result = _run(command + args, guarded_env)
        assert result.returncode == 0, result.stderr
        assert "usage: edgeprune" in result.stdout


def test_serve_without_server_side_says_what_is_missing(guarded_env: dict[str, str]) -> None:
    for args in (["serve", "--port", "0"], ["migrate", "--help"]):
        result = _run([sys.executable, "-m", "edgeprune.client.cli", *args], guarded_env)
        assert result.returncode == 2
        assert "server extra" in result.stderr
        assert "Traceback" not in result.stderr
    result = _run([sys.executable, "-m", "edgeprune.client.cli", "--help"], guarded_env)
    assert result.returncode == 0 and "migrate" in result.stdout


def test_serve_on_the_thin_install_names_the_extra(tmp_path: Path) -> None:
    """Only the server extra's packages are missing: one line saying what to install, exit 2."""
    (tmp_path / "sitecustomize.py").write_text(_sitecustomize(SERVER_EXTRA))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    commands = (
        [sys.executable, "-m", "edgeprune.client.cli", "serve", "--port", "0"],
        [sys.executable, "-m", "edgeprune.client.cli", "migrate"],
        [sys.executable, "-m", "edgeprune.service", "worker"],
    )
    for command in commands:
        result = _run(command, env)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "pip install 'edgeprune[server]'" in lines[0] and "Traceback" not in lines[0]
