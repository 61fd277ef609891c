"""Progress reporting: a bar with rate and ETA on a terminal, plain log lines otherwise.

Owns: what a person watching stdout sees during training. `trainer.progress=auto` picks the bar
when stdout is a TTY and periodic log lines when it is not (files, schedulers' log capture).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping

log = logging.getLogger("harness.control.progress")


def _format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """Reports training progress from `start_step` to `max_steps`."""

    def __init__(self, mode: str, *, start_step: int, max_steps: int, enabled: bool = True) -> None:
        if mode == "auto":
            mode = "bar" if sys.stdout.isatty() else "log"
        self.mode = mode if enabled else "none"
        self.max_steps = max_steps
        self._start_step = start_step
        self._start_time = time.perf_counter()
        self._bar = None
        if self.mode == "bar":
            from tqdm import tqdm  # only terminals need it

            self._bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True,
                             file=sys.stdout, smoothing=0.1)

    def advance(self, step: int) -> None:
        """Move the bar to `step` (cheap; called after every inner loop)."""
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def report(self, step: int, metrics: Mapping[str, float]) -> None:
        """Show metrics: as the bar's postfix, or as one log line with rate and ETA."""
        if self.mode == "none":
            return
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
            self.advance(step)
            return
        elapsed = time.perf_counter() - self._start_time
        rate = (step - self._start_step) / elapsed if elapsed > 0 else 0.0
        eta = (self.max_steps - step) / rate if rate > 0 else 0.0
        shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        log.info("step %d/%d (%d%%) %s | %.1f steps/s, eta %s", step, self.max_steps,
                 100 * step // self.max_steps, shown, rate, _format_duration(eta))

    def message(self, text: str) -> None:
        """A line that must not garble the bar."""
        if self._bar is not None:
            self._bar.write(text, file=sys.stdout)
        else:
            log.info(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
