"""A one-line terminal progress bar for pruning jobs: step, KL, sparsity and ETA.

No dependency: on a terminal the line is redrawn in place with ``\\r``; into a file or
pipe a plain line is written every ``log_every`` of progress (10 % by default), so logs
stay short.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

from ._output import describe_event, describe_warning

__all__ = ["JobProgress", "ProgressBar", "format_duration"]

_LOSS_LABELS = {"kl": "KL", "logit_diff": "logit-diff loss", "mse": "MSE"}


def format_duration(seconds: float | None) -> str:
    """``75`` -> ``"1:15"``, ``3725`` -> ``"1:02:05"``; unknown -> ``"?"``."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressBar:
    """Draws ``step 120/300 [######----] 40%  KL 0.1234  sparsity 91.2%  ETA 1:23``.

    Call :meth:`update` for each progress event and :meth:`close` at the end. The ETA
    comes from the server's steps/s when given, else from the wall time seen so far.
    """

    def __init__(
        self,
        *,
        stream: TextIO | None = None,
        width: int = 24,
        label: str = "",
        log_every: float = 0.1,
    ) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._tty = bool(getattr(self._stream, "isatty", lambda: False)())
        self._width = width
        self._label = label
        self._log_every = log_every
        self._start: tuple[float, int] | None = None  # (monotonic time, step) of first update
        self._last_logged = -1
        self._drawn = False

    def render(
        self,
        step: int,
        total: int,
        *,
        kl: float | None = None,
        sparsity: float | None = None,
        steps_per_s: float | None = None,
        eta_s: float | None = None,
        loss: float | None = None,
        loss_name: str = "",
    ) -> str:
        """The bar's text for these values (no side effects besides starting the clock).
        ``loss`` is shown under ``loss_name`` (a logit-difference loss is not a KL)."""
        now = time.monotonic()
        if self._start is None:
            self._start = (now, step)
        fraction = min(1.0, step / total) if total > 0 else 0.0
        filled = int(fraction * self._width)
        bar = "#" * filled + "-" * (self._width - filled)
        if eta_s is None and total > 0:
            rate = steps_per_s
            t0, s0 = self._start
            if not rate and step > s0 and now > t0:
                rate = (step - s0) / (now - t0)
            eta_s = (total - step) / rate if rate else None
        parts = [f"{self._label}step {step}/{total} [{bar}] {fraction:4.0%}"]
        if kl is not None:
            parts.append(f"KL {kl:.4f}")
        elif loss is not None:
            parts.append(f"{_LOSS_LABELS.get(loss_name, loss_name or 'loss')} {loss:.4f}")
        if sparsity is not None:
            parts.append(f"sparsity {sparsity:.1%}")
        parts.append(f"ETA {format_duration(eta_s if step < total else 0.0)}")
        return "  ".join(parts)

    def update(self, step: int, total: int, **values: Any) -> None:
        """Redraw (terminal) or log (file) the bar for the newest event."""
        line = self.render(step, total, **values)
        if self._tty:
            self._stream.write("\r\x1b[2K" + line)
            self._drawn = True
        else:
            bucket = int(step / total / self._log_every + 1e-9) if total > 0 else 0
            if bucket <= self._last_logged and step < total:
                return
            self._last_logged = bucket
            self._stream.write(line + "\n")
        self._stream.flush()

    def set_label(self, label: str) -> None:
        """Change the text before ``step``; a new label restarts the ETA clock."""
        if label != self._label:
            self._label = label
            self._start = None
            self._last_logged = -1

    def message(self, text: str) -> None:
        """Print a line (e.g. a state change) without garbling the bar."""
        if self._tty and self._drawn:
            self._stream.write("\r\x1b[2K")
            self._drawn = False
        self._stream.write(text + "\n")
        self._stream.flush()

    def close(self) -> None:
        """End the bar's line."""
        if self._tty and self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False


class JobProgress:
    """An ``on_event`` callback for :meth:`Client.wait` that draws a job's events.

    Progress events move the bar (with the phase, and the size for sweeps, as its
    label); state changes print a line of their own.
    """

    def __init__(self, bar: ProgressBar | None = None) -> None:
        self.bar = bar if bar is not None else ProgressBar()
        self._phase = ""

    def __call__(self, event: Any) -> None:
        kind = event.WhichOneof("event")
        if kind == "progress":
            p = event.progress
            if p.total_steps <= 0:  # a phase without steps (loading the model, the data)
                if p.phase and p.phase != self._phase:
                    self.bar.message(f"{p.phase} ...")
                self._phase = p.phase
                return
            self._phase = p.phase
            label = f"{p.phase} " if p.phase else ""
            if p.size_count > 1:
                label += f"size {p.size_index + 1}/{p.size_count} "
            self.bar.set_label(label)
            training = p.phase in ("", "prune")
            named = training and bool(p.loss_name)
            self.bar.update(
                p.step,
                p.total_steps,
                kl=p.kl if training and not named else None,
                loss=p.task_loss if named else None,
                loss_name=p.loss_name,
                sparsity=p.expected_edge_sparsity if training else None,
                steps_per_s=p.steps_per_second or None,
                eta_s=p.eta_seconds or None,
            )
        elif kind == "state_change":
            self.bar.message(describe_event(event))
        elif kind == "warning":
            self.bar.message(describe_warning(event.warning))

    def close(self) -> None:
        """End the bar's line."""
        self.bar.close()
