"""When the next periodic checkpoint is due: by steps, by wall time, within an overhead budget.

Owns: the checkpoint interval. Guarantees:
- A save is due every `checkpoint.every_steps` steps (at multiples of it), and also once
  `checkpoint.every_seconds` of wall time have passed since the last save, whichever comes first.
- With `checkpoint.max_overhead` (a fraction such as 0.03), the interval is stretched so that the
  time training is blocked by a save (median of the last three) stays within that fraction of
  the time between saves; each change of the chosen interval is logged. Step-based saves stay on
  multiples of `every_steps` (a stretched interval skips some of them); the interval shrinks back
  to the configured one when saves get cheaper again.
- Only the periodic saves are paced: the final save, the save on a stop signal (at the exact step
  the signal was seen) and the save where a rollback skip begins are the controller's and always
  happen. On several workers the controller agrees on `due` collectively, so all save together.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Callable

from harness.config.schema import CheckpointConfig

log = logging.getLogger(__name__)


class SavePacer:
    """Decides whether a periodic checkpoint is due after a given step."""

    def __init__(self, *, every_steps: int, every_seconds: float | None = None, max_overhead: float | None = None,
                 start_step: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.max_overhead = max_overhead
        self.interval_steps = every_steps  # the step interval in force (stretched by max_overhead)
        self.interval_seconds = every_seconds  # the time interval in force (None: by steps only)
        self._clock = clock
        self._last_save_step = start_step
        self._last_save_end = clock()
        self._seconds_per_step: float | None = None  # wall time per step between saves, last measured
        self._observed = (start_step, self._last_save_end)  # (step, clock) when `due` or `saved` last ran
        self._recent_save_seconds: deque[float] = deque(maxlen=3)

    @classmethod
    def from_config(cls, config: CheckpointConfig, *, start_step: int) -> SavePacer:
        return cls(every_steps=config.every_steps, every_seconds=config.every_seconds,
                   max_overhead=config.max_overhead, start_step=start_step)

    @property
    def depends_on_clock(self) -> bool:
        """Whether `due` depends on this process's clock (then workers must agree on it)."""
        return self.every_seconds is not None or self.max_overhead is not None

    def due(self, step: int) -> bool:
        """Whether a periodic save is due now that `step` has been reached."""
        self._follow_rollback(step)
        now = self._clock()
        observed_step, observed_at = self._observed
        if step > observed_step:
            self._seconds_per_step = (now - observed_at) / (step - observed_step)
        self._observed = (step, now)
        if step == self._last_save_step:
            return False
        if step % self.every_steps == 0 and (self.interval_steps == self.every_steps
                                             or step - self._last_save_step >= self.interval_steps):
            return True
        return self.interval_seconds is not None and now - self._last_save_end >= self.interval_seconds

    def next_due_step(self, step: int, *, use_local_clock: bool = True) -> int:
        """The first step after `step` at which a save may be due: an inner loop ends there.

        By time this is an estimate from the measured step time; `due` has the last word. With
        `use_local_clock=False` (several workers, whose inner loops must end at the same steps) it
        is the next multiple of `every_steps`, whatever this process measured: time-paced saves
        then happen at inner-loop ends (at least every `trainer.steps_per_loop` steps).
        """
        self._follow_rollback(step)
        if not use_local_clock:
            return (step // self.every_steps + 1) * self.every_steps
        earliest = step if self.interval_steps == self.every_steps else max(
            step, self._last_save_step + self.interval_steps - 1)
        boundary = (earliest // self.every_steps + 1) * self.every_steps
        if self.interval_seconds is not None and self._seconds_per_step:
            remaining = self.interval_seconds - (self._clock() - self._last_save_end)
            boundary = min(boundary, step + max(1, math.ceil(remaining / self._seconds_per_step)))
        return boundary

    def _follow_rollback(self, step: int) -> None:
        """A rollback restored an older checkpoint: the steps it replays count from the one restored."""
        if step < self._last_save_step:
            self._last_save_step = step
            self._observed = (step, self._clock())

    def saved(self, step: int, *, blocked_seconds: float, started: float | None = None) -> None:
        """Record a save at `step` that blocked training `blocked_seconds`, and re-choose the interval.

        `started`: the clock value when the save began (default: now - blocked_seconds).
        """
        now = self._clock()
        started = now - blocked_seconds if started is None else started
        trained_seconds = max(started - self._last_save_end, 0.0)
        if step > self._last_save_step and trained_seconds > 0:
            self._seconds_per_step = trained_seconds / (step - self._last_save_step)
        self._last_save_step, self._last_save_end = step, now
        self._observed = (step, now)
        self._recent_save_seconds.append(blocked_seconds)
        if self.max_overhead is not None:
            self._stretch(statistics.median(self._recent_save_seconds))

    def _stretch(self, save_seconds: float) -> None:
        """Make the time between saves at least save_seconds / max_overhead."""
        assert self.max_overhead is not None
        min_gap = save_seconds / self.max_overhead
        steps, seconds = self.every_steps, self.every_seconds
        if self._seconds_per_step:
            needed = math.ceil(min_gap / self._seconds_per_step)
            steps = max(self.every_steps, math.ceil(needed / self.every_steps) * self.every_steps)
        if seconds is not None:
            seconds = max(seconds, min_gap)
        if (steps, seconds) != (self.interval_steps, self.interval_seconds):
            self.interval_steps, self.interval_seconds = steps, seconds
            log.info("checkpoint interval now every %d steps%s: a save blocks training %.2f s, "
                     "checkpoint.max_overhead=%g keeps saving within %.1f%% of the time", steps,
                     f" or {seconds:.0f} s" if seconds is not None else "", save_seconds, self.max_overhead,
                     100 * self.max_overhead)
