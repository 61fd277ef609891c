"""Hang detection: a train loop, eval or checkpoint save that takes far longer than it has so far.

Owns: a daemon thread that watches the phase the controller is in. A process that hangs (a
deadlocked collective, a stopped peer, a filesystem that never answers) does not die, so a
scheduler would wait forever; the watchdog turns it into an exit the scheduler acts on.
Guarantees:
- The limit of a phase is `watchdog.factor` times the slowest it has been so far (per step for
  train loops, so longer loops get proportionally more time), never less than
  `watchdog.min_seconds`; the first occurrence of each phase (which traces and compiles) gets
  `watchdog.first_call_seconds`. That first one counts as "so far" too, which errs on the side of
  patience: a slow compile raises later limits (keep `steps_per_loop` steady to keep them tight).
- When a phase exceeds its limit: one log line naming the phase, its duration and limit, a stack
  dump of every Python thread (`faulthandler`) on stderr, the `on_hang` callback (the run record
  notes the hang), then the process exits at once with `ExitCode.STALLED` (4) from the watchdog
  thread: the main thread is stuck, so nothing else could end it. If that bookkeeping blocks too
  (train.log and the run record on the filesystem that hung), a timer exits after
  `BOOKKEEPING_SECONDS` regardless.
- Every limit also allows `patience_seconds`: the most the chief's save may sleep between its retries
  (`Checkpointer.longest_backoff_seconds`). The other workers wait for that save in their next
  collective, so on every worker a run still retrying stops on its own failure count (exit 5), not
  as hung, however far `checkpoint.retry_backoff_seconds` is raised.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from harness.config.schema import WatchdogConfig
from harness.errors import ExitCode

log = logging.getLogger(__name__)

_MAX_POLL_SECONDS = 1.0
BOOKKEEPING_SECONDS = 30.0  # the most the log line, stack dump and run record may take before the exit


@dataclass(frozen=True)
class _Phase:
    kind: str  # train | eval | save | ...
    units: int  # steps for train loops, 1 otherwise
    started: float  # time.monotonic()
    limit_seconds: float


class Watchdog:
    """Watch `with watchdog.phase(kind, units=n):` blocks; exit the process if one hangs."""

    def __init__(self, config: WatchdogConfig, *, on_hang: Callable[[str], None] | None = None,
                 patience_seconds: float = 0.0) -> None:
        self.config = config
        self.on_hang = on_hang
        self.patience_seconds = patience_seconds  # added to every limit (see the module docstring)
        self._slowest_per_unit: dict[str, float] = {}
        self._current: _Phase | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Watchdog:
        if self.config.enabled:
            self._thread = threading.Thread(target=self._watch, name="harness-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def limit_seconds(self, kind: str, units: int = 1) -> float:
        slowest = self._slowest_per_unit.get(kind)
        if slowest is None:
            return self.config.first_call_seconds + self.patience_seconds
        return max(self.config.min_seconds, self.config.factor * slowest * units) + self.patience_seconds

    @contextmanager
    def phase(self, kind: str, *, units: int = 1) -> Iterator[None]:
        """Time the block as one `kind` phase of `units` steps; a block that raises is not measured."""
        phase = _Phase(kind, units, time.monotonic(), self.limit_seconds(kind, units))
        self._current = phase
        try:
            yield
        finally:
            self._current = None
        per_unit = (time.monotonic() - phase.started) / max(units, 1)
        self._slowest_per_unit[kind] = max(per_unit, self._slowest_per_unit.get(kind, 0.0))

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_seconds()):
            phase = self._current
            if phase is not None and time.monotonic() - phase.started > phase.limit_seconds:
                self._hang(phase)

    def _poll_seconds(self) -> float:
        phase = self._current
        return min(_MAX_POLL_SECONDS, phase.limit_seconds / 10) if phase else _MAX_POLL_SECONDS

    def _hang(self, phase: _Phase) -> None:
        backstop = threading.Timer(BOOKKEEPING_SECONDS, os._exit, args=(ExitCode.STALLED,))
        backstop.daemon = True
        backstop.start()
        elapsed = time.monotonic() - phase.started
        what = f"{phase.kind} ({phase.units} steps)" if phase.kind == "train" else phase.kind
        log.error("watchdog: %s has run for %.1f s, over its limit of %.1f s (watchdog.factor=%g x the slowest so "
                  "far, at least watchdog.min_seconds=%g, plus %.0f s for save retries' back-off): the process is "
                  "hung. Stacks of all threads follow; exiting with code %d so the scheduler restarts it.", what,
                  elapsed, phase.limit_seconds, self.config.factor, self.config.min_seconds, self.patience_seconds,
                  ExitCode.STALLED)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        if self.on_hang is not None:
            try:
                self.on_hang(phase.kind)
            except Exception as error:  # the exit matters more than the bookkeeping
                log.warning("watchdog: recording the hang failed: %s", error)
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(ExitCode.STALLED)
