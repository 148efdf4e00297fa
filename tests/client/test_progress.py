"""The progress bar: step, KL, sparsity and ETA, redrawn on a terminal, logged in steps to a file."""

from __future__ import annotations

import io

from edgeprune.client.progress import ProgressBar, format_duration


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
