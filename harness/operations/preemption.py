"""Graceful preemption: turn stop signals into "save at the step reached, then exit".

Owns: the signal handlers for `preemption.signals` and, across workers, agreeing on the step to
stop at. Guarantees:
- A handled signal only sets a flag; the training step in flight finishes. The outer loop checks
  the flag between inner loops (at most `trainer.steps_per_loop` steps later), saves a checkpoint
  at exactly the step reached and exits with `preemption.exit_code`: no step is lost.
- Further signals while stopping are reported and ignored, so a scheduler that repeats SIGTERM
  cannot interrupt the save. (SIGKILL cannot be handled; the checkpoint write protocol in
  `harness/checkpoint/checkpointer.py` makes that safe too.)
- With several workers, each one's flags (stop requested, lease lost) are all-reduced after every
  inner loop, so every worker sees the same decision at the same step and they all save that
  step together (or all stop without saving). This is the
  same agreement `tf.distribute.experimental.PreemptionCheckpointHandler` reaches through the
  coordination service, but for any signal and with our own exit code.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType, TracebackType

import tensorflow as tf

from harness.config.schema import parse_signals
from harness.distributed.strategy import num_workers

_received_between_jobs: list[signal.Signals] = []  # stop signals caught after one multirun job, before the next


def carry_stop_signals_to_the_next_job(signal_names: list[str]) -> None:
    """Between two jobs of a Hydra multirun (one process): a stop signal that arrives while the next job
    starts (loads data, restores) is kept, and that job stops at its first boundary as if it had arrived
    there; otherwise it would be lost, and the scheduler's SIGKILL would follow without a save."""
    def keep(signum: int, frame: FrameType | None) -> None:
        _received_between_jobs.append(signal.Signals(signum))
        os.write(2, f"received {signal.Signals(signum).name} between sweep jobs: the next job stops at its first "
                    "step boundary\n".encode())

    if threading.current_thread() is threading.main_thread():
        for sig in parse_signals(signal_names):
            signal.signal(sig, keep)


class PreemptionWatcher:
    """Context manager installing the stop-signal handlers; `requested` tells if one arrived."""

    def __init__(self, signal_names: list[str], *, exit_code: int) -> None:
        self._signals = parse_signals(signal_names)
        self.exit_code = exit_code
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}  # handlers replaced by ours

    def __enter__(self) -> PreemptionWatcher:
        if threading.current_thread() is threading.main_thread():  # handlers only install there
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        if _received_between_jobs:
            self.received = _received_between_jobs[0]
            _received_between_jobs.clear()
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        # Not the previous handlers: a stop signal during interpreter teardown (after the final
        # checkpoint) must not turn a finished run into a "killed by SIGTERM" exit.
        for sig in self._previous:
            signal.signal(sig, self._handle_after_training)

    def _handle_after_training(self, signum: int, frame: FrameType | None) -> None:
        os.write(2, f"received {signal.Signals(signum).name} after training ended: exiting normally\n".encode())

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signal.Signals(signum)
            message = (f"received {name}: finishing the current steps, saving a checkpoint, then exiting with "
                       f"code {self.exit_code}\n")
        else:
            message = f"received {name} again: still saving the checkpoint, please wait\n"
        os.write(2, message.encode())  # async-signal-safe, unlike logging


class StopAgreement:
    """Makes all workers take the same stop decisions at the same step (identity on one worker)."""

    def __init__(self, strategy: tf.distribute.Strategy) -> None:
        self._strategy = strategy
        self._multi_worker = num_workers(strategy) > 1
        if self._multi_worker:
            self._sum = tf.function(self._reduce_sum)

    def _reduce_sum(self, flags: tf.Tensor) -> tf.Tensor:
        per_replica = self._strategy.run(lambda: tf.identity(flags))
        return self._strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    def any_of(self, local_flags: list[bool]) -> list[bool]:
        """Per flag: true if it is set on this or any other worker. A collective call on several workers."""
        if not self._multi_worker:
            return list(local_flags)
        summed = self._sum(tf.constant([1.0 if flag else 0.0 for flag in local_flags])).numpy()
        return [bool(value > 0) for value in summed]

    def chiefs(self, local_flags: list[bool], *, is_chief: bool) -> list[bool]:
        """Per flag: the chief's value, on every worker (a collective call on several workers). For decisions
        that follow what only the chief measures, such as how long its checkpoint writes block training."""
        return self.any_of([flag and is_chief for flag in local_flags])
