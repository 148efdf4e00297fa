"""The command line's view of task parameters: `edgeprune info` lists each task's, and
`--task-param` sends them (checked by the server, the field named in the error)."""

from __future__ import annotations

import json

import pytest

from edgeprune.client import job_spec
from tests.client.conftest import TINY_MODEL, ClientServer
from tests.client.test_cli import run


def test_info_lists_task_params(capsys: pytest.CaptureFixture[str],
                                client_server: ClientServer) -> None:
    code, out, _ = run(capsys, client_server, "info")
    lines = {line.split()[1].rstrip(":"): line for line in out.splitlines() if line.startswith("task ")}
    assert code == 0 and {"ioi", "mcqa", "arithmetic"} <= set(lines)
    assert "n_choices: int in [2, 4], default 4" in lines["mcqa"]
    assert "operation: one of add, sub, default add" in lines["arithmetic"]
    assert "multi_token: true or false, default true" in lines["arithmetic"]
    assert "no parameters" in lines["ioi"]


def test_task_params_are_sent_and_checked(capsys: pytest.CaptureFixture[str],
                                          client_server: ClientServer) -> None:
    submit = ("submit", "--model", TINY_MODEL, "--task", "mcqa", "--task-examples", "8",
              "--priority", "-100", "--json")
    code, _, err = run(capsys, client_server, *submit, "--task-param", "n_choices=9")
    assert code == 3 and json.loads(err)["field"] == "spec.data.task.params['n_choices']"
    code, _, err = run(capsys, client_server, *submit, "--task-param", "n_choices")
    assert code == 3 and "KEY=VALUE" in err
    code, out, _ = run(capsys, client_server, *submit, "--task-param", "n_choices=2")
    job = json.loads(out)
    assert code == 0 and job["spec"]["data"]["task"]["params"] == {"n_choices": "2"}
    assert run(capsys, client_server, "jobs", "cancel", job["name"])[0] == 0


def test_typed_params_travel_as_the_servers_text() -> None:
    spec = job_spec(model=TINY_MODEL, task="arithmetic",
                    task_params={"multi_token": False, "max_operand": 999})
    assert dict(spec.data.task.params) == {"multi_token": "false", "max_operand": "999"}
