"""The progress bar: step, KL, sparsity and ETA, redrawn on a terminal, logged in steps to a file."""

from __future__ import annotations

import io

from edgeprune.client._output import describe_job
from edgeprune.client.progress import JobProgress, ProgressBar, format_duration
from edgeprune.v1 import job_pb2


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0, 75, 3725)] == ["0:00", "1:15", "1:02:05"]
    assert format_duration(None) == format_duration(float("inf")) == format_duration(-1) == "?"


def test_render_shows_step_kl_sparsity_and_eta() -> None:
    line = ProgressBar(width=10).render(30, 120, kl=0.01234, sparsity=0.9123, steps_per_s=2.0)
    assert line == "step 30/120 [##--------]  25%  KL 0.0123  sparsity 91.2%  ETA 0:45"
    done = ProgressBar(width=4).render(8, 8, kl=0.5)
    assert done.endswith("ETA 0:00") and "[####]" in done


def test_terminal_redraws_in_place_and_file_logs_every_tenth() -> None:
    tty = _Tty()
    bar = ProgressBar(stream=tty, width=4)
    for step in range(1, 4):
        bar.update(step, 3, eta_s=1.0)
    bar.message("job: SUCCEEDED")
    assert tty.getvalue().count("\r") == 4 and tty.getvalue().endswith("job: SUCCEEDED\n")

    log = io.StringIO()
    bar = ProgressBar(stream=log, width=4)
    for step in range(1, 101):
        bar.update(step, 100, eta_s=1.0)
    lines = log.getvalue().splitlines()
    assert len(lines) == 11  # the first step, then every 10 %
    assert lines[1].startswith("step 10/100") and lines[-1].startswith("step 100/100")


def test_job_progress_names_the_loss_and_prints_warnings() -> None:
    out = io.StringIO()
    printer = JobProgress(ProgressBar(stream=out, width=4))
    event = job_pb2.JobEvent(job="jobs/j1", progress=job_pb2.JobProgress(
        phase="prune", step=1, total_steps=1, loss_name="logit_diff", task_loss=0.25,
        expected_edge_sparsity=0.5))
    printer(event)
    assert "logit-diff loss 0.2500" in out.getvalue() and "KL" not in out.getvalue()
    warning = job_pb2.JobWarning(reason="TARGET_NOT_REACHED", message="short of 99.00%",
                                 size_index=0)
    printer(job_pb2.JobEvent(job="jobs/j1", warning=warning))
    assert out.getvalue().splitlines()[-1] == (
        "warning (size 1) TARGET_NOT_REACHED: short of 99.00%")
    job = job_pb2.Job(name="jobs/j1", state=job_pb2.JOB_STATE_SUCCEEDED)
    job.result.circuits.append("circuits/c1")
    job.result.warnings.add(reason="NO_BETTER_THAN_EMPTY", message="faithfulness 0.01",
                            circuit="circuits/c1")
    assert ("warning", "(circuits/c1) NO_BETTER_THAN_EMPTY: faithfulness 0.01") in describe_job(job)
