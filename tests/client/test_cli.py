"""The `edgeprune` command line against the real server: tables, --json, job files, the
progress bar, SVG pictures, and exit codes that say what failed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeprune.client.cli import main
from tests.client.conftest import TINY_MODEL, ClientServer, tiny_job


def run(capsys: pytest.CaptureFixture[str], server: ClientServer, *args: str) -> tuple[int, str, str]:
    command, *rest = args
    sub = [command] if command not in ("jobs", "datasets", "circuits") else [command, rest.pop(0)]
    code = main([*sub, "--target", server.target, *rest])
    out, err = capsys.readouterr()
    return code, out, err


def test_submit_from_a_job_file_and_watch_with_the_progress_bar(
    capsys: pytest.CaptureFixture[str], client_server: ClientServer, tmp_path: Path
) -> None:
    options = tiny_job()
    job_file = tmp_path / "job.yaml"
    job_file.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in options.items() if v is not None))
    code, out, err = run(capsys, client_server, "submit", str(job_file), "--label", "via=cli", "--watch")
    assert code == 0, err
    assert "step " in err and "KL " in err and "ETA " in err and "SUCCEEDED" in err
    assert "SUCCEEDED" in out
    circuit = next(line.split()[-1] for line in out.splitlines() if line.startswith("circuit:"))

    code, out, _ = run(capsys, client_server, "circuits", "show", circuit, "--svg", str(tmp_path / "c.svg"), "--edges", "3")
    assert code == 0 and "faithfulness" in out and "top 3 edges" in out
    assert "<svg" in (tmp_path / "c.svg").read_text()

    code, out, _ = run(capsys, client_server, "circuits", "list", "--model", TINY_MODEL, "--json")
    assert code == 0 and circuit in [c["name"] for c in json.loads(out)]
    code, out, _ = run(capsys, client_server, "circuits", "list", "--model", TINY_MODEL)
    assert out.splitlines()[0].split()[:3] == ["CIRCUIT", "MODEL", "TASK"]
    code, out, _ = run(capsys, client_server, "circuits", "compare", circuit, circuit)
    assert code == 0 and "edge jaccard:" in out and "1.0000" in out
    code, out, _ = run(capsys, client_server, "circuits", "export", circuit, str(tmp_path / "c.dot"), "--format", "dot")
    assert code == 0 and "digraph" in (tmp_path / "c.dot").read_text()

    code, out, _ = run(capsys, client_server, "jobs", "list", "--json")
    jobs = json.loads(out)
    assert any(j["labels"].get("via") == "cli" for j in jobs)
    code, out, _ = run(capsys, client_server, "jobs", "list", "--state", "succeeded")
    assert code == 0 and out.splitlines()[0].startswith("JOB")


def test_submit_flags_json_and_wait(capsys: pytest.CaptureFixture[str], client_server: ClientServer) -> None:
    code, out, err = run(
        capsys, client_server, "submit", "--model", TINY_MODEL, "--task", "ioi", "--task-examples", "16",
        "--sparsity", "0.5", "--steps", "4", "--batch-size", "4", "--activation-checkpointing",
        "--json", "--wait",
    )
    assert code == 0, err
    job = json.loads(out)
    assert job["state"] == "JOB_STATE_SUCCEEDED" and job["result"]["circuits"]
    assert job["spec"]["edge_pruning"]["activation_checkpointing"] is True
    code, out, _ = run(capsys, client_server, "jobs", "watch", job["name"], "--json")
    events = [json.loads(line) for line in out.splitlines()]
    assert [int(e["sequence"]) for e in events] == list(range(1, len(events) + 1))
    code, out, _ = run(capsys, client_server, "jobs", "get", job["name"])
    assert code == 0 and "SUCCEEDED" in out


def test_datasets_commands(capsys: pytest.CaptureFixture[str], client_server: ClientServer, tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"clean": "a b", "corrupted": "c b", "target": " x", "distractor": " y"}) + "\n")
    code, out, _ = run(capsys, client_server, "datasets", "upload", str(path), "--json")
    dataset = json.loads(out)
    assert code == 0 and int(dataset["example_count"]) == 1 and dataset["display_name"] == "mine"
    code, out, _ = run(capsys, client_server, "datasets", "list")
    assert dataset["name"].split("/")[1] in out
    assert run(capsys, client_server, "datasets", "delete", dataset["name"])[0] == 0
    assert run(capsys, client_server, "datasets", "get", dataset["name"])[0] == 4


def test_exit_codes_and_messages(capsys: pytest.CaptureFixture[str], client_server: ClientServer, tmp_path: Path) -> None:
    code, _, err = run(capsys, client_server, "jobs", "get", "jobs/missing")
    assert code == 4 and err.startswith("edgeprune: error:") and "Traceback" not in err
    code, _, err = run(capsys, client_server, "submit", "--model", "nope", "--task", "ioi")
    assert code == 3 and "spec.model" in err
    code, _, err = run(capsys, client_server, "submit", "--model", TINY_MODEL, "--task", "ioi", "--steps", "-1", "--json")
    assert code == 3 and json.loads(err)["field"] == "spec.edge_pruning.steps"
    code, _, err = run(capsys, client_server, "submit", "--task", "ioi")
    assert code == 3 and "--model" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [")
    assert run(capsys, client_server, "submit", str(bad))[0] == 3
    code, _, err = run(capsys, client_server, "submit", "--model", TINY_MODEL, "--task", "ioi", "--label", "novalue")
    assert code == 3 and "KEY=VALUE" in err

    code, out, _ = run(capsys, client_server, "submit", "--model", TINY_MODEL, "--task", "ioi",
                       "--task-examples", "16", "--priority", "-100", "--json")
    name = json.loads(out)["name"]
    assert run(capsys, client_server, "jobs", "cancel", name)[0] == 0
    assert run(capsys, client_server, "jobs", "watch", name)[0] == 11  # the job was cancelled

    assert main(["info", "--target", "127.0.0.1:1", "--timeout", "1"]) == 9
    capsys.readouterr()
    with pytest.raises(SystemExit) as usage:
        main(["jobs", "frobnicate"])
    assert usage.value.code == 2


def test_migrate_upgrades_a_database(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """`edgeprune migrate` is the service's migrate command: its options, --help, and the run."""
    with pytest.raises(SystemExit) as done:
        main(["migrate", "--help"])
    assert done.value.code == 0
    assert "usage: edgeprune migrate" in capsys.readouterr().out
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    assert main(["migrate", "--database-url", url, "--log-level", "warning"]) == 0
    revision = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["revision"]
    assert revision and (tmp_path / "fresh.db").is_file()
    assert main(["migrate", "--database-url", url, "--log-level", "warning"]) == 0, "idempotent"
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["revision"] == revision
