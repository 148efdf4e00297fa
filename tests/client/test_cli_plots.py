"""`edgeprune circuits plot` and `edgeprune jobs plot` against the real server, and the typed
client's export_job_plot: files that decode as pictures, the top-edges listing in the drawings'
order, and a bad option's exit code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeprune.client import Client
from tests.client.conftest import ClientServer, tiny_job
from tests.client.test_cli import run
from tests.engine.test_drawing import check_picture


def test_circuit_and_job_plots(capsys: pytest.CaptureFixture[str], client_server: ClientServer,
                               client: Client, tmp_path: Path) -> None:
    job = client.submit(**tiny_job())
    done = client.wait(job.name)
    job_name, circuit = done.name, done.result.circuits[0]

    code, out, err = run(capsys, client_server, "circuits", "plot", circuit, "--format", "png",
                         "--top-k", "20", "--layout", "builtin", "-o", str(tmp_path / "c.png"))
    assert code == 0, err
    assert out.strip() == str(tmp_path / "c.png")
    check_picture((tmp_path / "c.png").read_bytes(), min_size=150)
    code, out, err = run(capsys, client_server, "circuits", "plot", circuit, "--kind", "per-layer",
                         "--json", "-o", str(tmp_path))
    assert code == 0, err
    assert json.loads(out)["path"].endswith("-per-layer.svg")

    code, out, err = run(capsys, client_server, "jobs", "plot", job_name, "--format", "png",
                         "-o", str(tmp_path / "training.png"))
    assert code == 0, err
    check_picture((tmp_path / "training.png").read_bytes(), min_size=400, min_colours=20)
    path = client.export_job_plot(job_name, tmp_path, plot="faithfulness")
    assert path.name.endswith("-faithfulness.svg") and b"CPR" in path.read_bytes()

    # the listing ranks Edge Pruning's edges by log-alpha, as the drawings do
    code, out, _ = run(capsys, client_server, "circuits", "show", circuit, "--edges", "4")
    assert code == 0 and "top 4 edges by log-alpha (keep probability):" in out
    scores = [float(line.split()[-1]) for line in out.split("keep probability):")[1].splitlines()[2:]
              if line.strip()]
    assert scores == sorted(scores, reverse=True) and len(scores) == 4

    code, _, err = run(capsys, client_server, "circuits", "plot", circuit, "--top-k", "-3",
                       "-o", str(tmp_path / "bad.svg"))
    assert code == 3 and "top_k" in err
    assert not (tmp_path / "bad.svg").exists()
