"""The outer loop: runs the inner loop to the next boundary, then the actions, until done or stopped.

Owns: where boundaries fall (every action's `next_step`, `trainer.steps_per_loop`, `max_steps`), so
events happen at exact steps whatever `steps_per_loop` is; the stop and lease agreement after each
inner loop (collective, so every worker ends the same loop the same way); and turning a lost peer
into `StalledError` and a bad data file into its `DataError`. What happens at a boundary is the
actions' (`harness/control/actions.py`, whose order makes every checkpoint a good one). The global
step is the training state's; the attempt is told each step reached, for its record of a crash or
hang. Every inner loop runs under the hang watchdog.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import tensorflow as tf

from harness.control.actions import Action, Boundary
from harness.control.progress import Progress
from harness.data.pipeline import SeekableInput
from harness.distributed.strategy import lost_peers_stall
from harness.operations.attempt import Attempt
from harness.operations.preemption import PreemptionWatcher, StopAgreement
from harness.operations.watchdog import Watchdog
from harness.training.loop import TrainLoop
from harness.training.state import TrainState

log = logging.getLogger(__name__)


class Status(enum.Enum):
    COMPLETED = "completed"  # reached max_steps in this process
    ALREADY_COMPLETE = "already_complete"  # the restored checkpoint was at max_steps
    PREEMPTED = "preempted"  # a stop signal arrived; saved at the step reached


@dataclass(frozen=True)
class Outcome:
    status: Status
    step: int
    exit_code: int
    final_metrics: dict[str, float]


@dataclass
class Controller:
    """Drives training from the restored step to `max_steps`: inner loop, then `actions`, repeated."""

    strategy: tf.distribute.Strategy
    state: TrainState  # owns the global step
    pipeline: SeekableInput
    train_loop: TrainLoop
    actions: Sequence[Action]  # run in order after every inner loop (see `actions.standard_actions`)
    max_steps: int
    steps_per_loop: int
    watcher: PreemptionWatcher  # stop signals
    attempt: Attempt  # the lease (chief) and the record of the step reached
    watchdog: Watchdog
    progress: Progress

    def run(self) -> Outcome:
        with lost_peers_stall(self.strategy, when=lambda: f"at step {self.attempt.step}"):
            try:
                return self._run()
            except tf.errors.OpError as error:
                data_error = self.pipeline.read_failure_behind(error)
                if data_error is not None:  # a data file went bad mid-run: the user's to fix
                    raise data_error from None
                raise
            finally:
                self.progress.close()

    def _run(self) -> Outcome:
        step = int(self.state.step.numpy())
        if step >= self.max_steps:
            log.info("training already complete: the checkpoint is at step %d and trainer.max_steps is %d; "
                     "nothing to do (raise trainer.max_steps to train further)", step, self.max_steps)
            return Outcome(Status.ALREADY_COMPLETE, step, 0, {})
        agreement = StopAgreement(self.strategy)
        iterator = self._iterator()
        metrics: dict[str, float] = {}
        while step < self.max_steps:
            boundary = self._run_inner_loop(iterator, agreement, start_step=step)
            self._reached(boundary.step)
            for action in self.actions:
                action(boundary)
            step = boundary.step
            if boundary.rolled_back:
                self._reached(step)
            metrics.update(boundary.metrics)
            if boundary.stopped_with_exit_code is not None:
                return Outcome(Status.PREEMPTED, step, boundary.stopped_with_exit_code, metrics)
            if boundary.input_moved:
                iterator = self._iterator()
        return Outcome(Status.COMPLETED, step, 0, metrics)

    def _run_inner_loop(self, iterator, agreement: StopAgreement, *, start_step: int) -> Boundary:
        """Train up to the next boundary, then agree with every worker on stopping and on the lease."""
        num_steps = self._next_boundary(start_step) - start_step
        started = time.perf_counter()
        with self.watchdog.phase("train", units=num_steps):
            self.train_loop(iterator, tf.constant(num_steps, tf.int64))
            losses = self.train_loop.step_losses.read(num_steps)  # collective: every worker sees the same
            lease = self.attempt.lease
            stop, lease_lost = agreement.any_of([self.watcher.requested, lease is not None and lease.lost])
        step = start_step + num_steps  # what the state's step now holds, without a read back from the device
        return Boundary(start_step=start_step, step=step, losses=losses, train_seconds=time.perf_counter() - started,
                        stop_requested=stop, lease_lost=lease_lost, is_final=step == self.max_steps)

    def _next_boundary(self, step: int) -> int:
        wanted = [self.max_steps, step + self.steps_per_loop]
        wanted += [due for action in self.actions if (due := action.next_step(step)) is not None and due > step]
        return min(wanted)

    def _reached(self, step: int) -> None:
        self.attempt.step = step  # recorded if the process crashes or hangs from here on
        self.progress.advance(step)

    def _iterator(self):
        """The input from the next step to `max_steps` (a new one whenever the input moves: a rollback's skip)."""
        return self.pipeline.distributed_train_iterator(self.strategy, start_step=self.state.batch_index,
                                                        num_steps=self.max_steps - int(self.state.step.numpy()))
