"""The outer loop: runs inner loops and does every side effect between them.

Owns: the global step as the loop sees it, when to log, evaluate, checkpoint, roll back and stop.
Each inner loop runs exactly up to the next event boundary (log, eval, checkpoint, `max_steps`, a
pending batch skip), so events happen at exact steps whatever `steps_per_loop` is. After every
inner loop: divergence check -> metrics -> eval -> flush summaries -> stop agreement ->
checkpoint -> stop. So a checkpoint at step `s` implies that every summary up to `s` is on disk
and that no step up to `s` diverged: every checkpoint is a good one to roll back to.
Stopping: a stop signal saves then exits with the preemption code; a lost lease exits without
writing (`LeaseConflictError`); divergence beyond `trainer.max_rollbacks` raises `DivergedError`.
Every inner loop, eval and save runs under the hang watchdog.
"""

from __future__ import annotations

import enum
import functools
import logging
import time
from dataclasses import dataclass

import tensorflow as tf

from harness.checkpoint.checkpointer import Checkpointer
from harness.checkpoint.pacing import SavePacer
from harness.config.schema import TrainerConfig
from harness.control.progress import Progress
from harness.control.summaries import Summaries
from harness.data.pipeline import SeekableInput
from harness.distributed.strategy import num_workers
from harness.errors import DivergedError, LeaseConflictError, StalledError
from harness.operations.attempt import Attempt
from harness.operations.lease import Lease
from harness.operations.preemption import PreemptionWatcher, StopAgreement
from harness.operations.watchdog import Watchdog
from harness.tasks import Task
from harness.training.divergence import RollbackPlan, first_divergence, plan_rollback
from harness.training.loop import EvalLoop, TrainLoop
from harness.training.optimization import current_learning_rate
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


# What a collective raises when a peer is gone (TF 2.21: UnavailableError for missed heartbeats).
_PEER_LOST_ERRORS = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError,
                     tf.errors.DeadlineExceededError)


def _first_line(error: tf.errors.OpError) -> str:
    lines = [line.strip() for line in error.message.splitlines() if line.strip() and "Graph execution" not in line]
    return (lines[0] if lines else type(error).__name__)[:300]


def _next_multiple(step: int, every: int) -> int:
    return (step // every + 1) * every


@dataclass
class Controller:
    """Drives training from the restored step to `trainer.max_steps`."""

    strategy: tf.distribute.Strategy
    task: Task  # turns the accumulated sums into the metrics that are logged
    state: TrainState
    pipeline: SeekableInput
    train_loop: TrainLoop
    eval_loop: EvalLoop
    checkpointer: Checkpointer
    save_pacer: SavePacer  # when periodic checkpoints are due (every_steps, every_seconds, max_overhead)
    summaries: Summaries
    progress: Progress
    watcher: PreemptionWatcher
    trainer: TrainerConfig
    watchdog: Watchdog
    attempt: Attempt  # the lease (chief) and the run record

    def __post_init__(self) -> None:
        self.step = int(self.state.step.numpy())

    @property
    def step(self) -> int:
        """The step reached: kept in the attempt, which records it if the process crashes or hangs."""
        return self.attempt.step

    @step.setter
    def step(self, value: int) -> None:
        self.attempt.step = value

    @property
    def lease(self) -> Lease | None:
        return self.attempt.lease

    def run(self) -> Outcome:
        try:
            return self._run()
        except tf.errors.OpError as error:
            if self.pipeline.read_failure is not None:  # a data file went bad mid-run: the user's to fix
                raise self.pipeline.read_failure from None
            if isinstance(error, _PEER_LOST_ERRORS) and num_workers(self.strategy) > 1:
                raise StalledError(
                    f"Lost contact with another worker at step {self.step}: {_first_line(error)} That worker "
                    "crashed, was killed or froze (check its log). Exiting so the scheduler restarts the whole job; "
                    "every worker resumes from the newest checkpoint.") from None
            raise  # not a lost peer: a bug or a local failure, keep the traceback
        finally:
            self.progress.close()

    def _run(self) -> Outcome:
        step = self.step
        max_steps = self.trainer.max_steps
        if step >= max_steps:
            log.info("training already complete: the checkpoint is at step %d and trainer.max_steps is %d; "
                     "nothing to do (raise trainer.max_steps to train further)", step, max_steps)
            return Outcome(Status.ALREADY_COMPLETE, step, 0, {})
        agreement = StopAgreement(self.strategy)
        iterator = self._iterator()
        window_start, window_time, metrics = step, time.perf_counter(), {}
        while step < max_steps:
            skip_starts = {start for start, _ in self.state.skips()}  # only a rollback changes it, then `continue`s
            num_steps = self._steps_until_next_event(step, skip_starts)
            with self.watchdog.phase("train", units=num_steps):
                self.train_loop(iterator, tf.constant(num_steps, tf.int64))
                losses = self.train_loop.step_losses.read(num_steps)  # collective: every worker sees the same
                lease_lost_here = self.lease is not None and self.lease.lost
                stop, lease_lost = agreement.any_of([self.watcher.requested, lease_lost_here])
            divergence = first_divergence(losses, first_step=step, upper_bound=self.trainer.loss_upper_bound)
            if divergence is not None:
                step = self._roll_back(plan_rollback(divergence, skip_batches=self.trainer.rollback_skip_batches))
                iterator = self._iterator()
                window_start, window_time = step, time.perf_counter()
                continue
            step += num_steps
            self.step = step
            self.progress.advance(step)
            if lease_lost:
                raise LeaseConflictError(self.lease.lost_message() if self.lease else "The chief lost its lease on "
                                         "checkpoint.dir; every worker stops without writing.")
            if step % self.trainer.log_every == 0 or step == max_steps:
                seconds = time.perf_counter() - window_time
                # Recorded before it is printed: a step anyone saw reached is in the run record.
                self.attempt.accounting.progress(step, seconds_per_step=seconds / max(step - window_start, 1))
                metrics = self._log_train(step, steps=step - window_start, seconds=seconds)
                window_start = step
            if self._eval_due(step):
                metrics.update(self.evaluate(step))
            skip_now = step in skip_starts
            if skip_now:  # a rollback skip takes effect here; saved at once below
                self._apply_skips(step)
                iterator = self._iterator()
            if self._periodic_save_due(step) or step == max_steps or stop or skip_now:  # first: may be collective
                self._save(step)
            if stop:
                self._wait_for_saves()
                log.info("stopped at step %d after a stop signal; checkpoint saved; exiting with code %d",
                         step, self.watcher.exit_code)
                return Outcome(Status.PREEMPTED, step, self.watcher.exit_code, metrics)
            if window_start == step:
                window_time = time.perf_counter()
        self._wait_for_saves()
        return Outcome(Status.COMPLETED, step, 0, metrics)

    def _iterator(self):
        return self.pipeline.distributed_train_iterator(self.strategy, start_step=self.state.batch_index)

    def _steps_until_next_event(self, step: int, skip_starts: set[int]) -> int:
        boundaries = [self.trainer.max_steps, _next_multiple(step, self.trainer.log_every),
                      self.save_pacer.next_due_step(step, use_local_clock=num_workers(self.strategy) == 1),
                      step + self.trainer.steps_per_loop]
        if self.trainer.eval_every:
            boundaries.append(_next_multiple(step, self.trainer.eval_every))
        boundaries += [start for start in skip_starts if start > step]
        return min(boundaries) - step

    # -- divergence rollback -------------------------------------------------------------------------
    def _roll_back(self, plan: RollbackPlan) -> int:
        """Restore the newest good checkpoint at or before the plan's skip step; return its step."""
        divergence, done = plan.divergence, int(self.state.rollbacks.numpy())
        if done >= self.trainer.max_rollbacks:
            self.summaries.scalars(divergence.step, {"faults/diverged_loss": divergence.loss})
            raise DivergedError(
                f"Training diverged: {divergence.describe()}, after {done} rollbacks already "
                f"(trainer.max_rollbacks={self.trainer.max_rollbacks}). Stopping without saving; the newest "
                f"checkpoint (step <= {divergence.step}) is intact. Lower optimizer.learning_rate, add "
                "optimizer.global_clipnorm, or check the data around this step, then rerun (raise "
                "trainer.max_rollbacks to keep trying).")
        with self.watchdog.phase("save"):  # an async write still in flight
            self.checkpointer.discard_pending_write()
        restore_before = plan.skip_from_step
        skips = [*self.state.skips(), (plan.skip_from_step, plan.skip_batches)]  # not restored: what we know now
        restored = self.checkpointer.restore_latest(max_step=restore_before)
        if restored.step is None:
            raise DivergedError(
                f"Training diverged: {divergence.describe()}, and no checkpoint at or before step {restore_before} "
                f"exists to roll back to (trainer.rollback_skip_batches={plan.skip_batches}). Stopping; lower "
                "checkpoint.every_steps so that a rollback has somewhere to go, or fix the cause (learning rate, "
                "data).")
        abandoned = self.checkpointer.delete_newer_than(restored.step)  # before anything of the new trajectory
        self.state.rollbacks.assign(done + 1)
        self.state.set_skips(skips)
        self.train_loop.metrics.read_and_reset()  # sums of the abandoned steps
        self.summaries.restart_at(restored.step)  # the abandoned steps' points vanish from TensorBoard
        self.summaries.scalars(divergence.step, {"faults/rollbacks": done + 1, "faults/diverged_loss": divergence.loss})
        self.attempt.accounting.rollback()
        log.warning("rollback %d of %d: %s; restored checkpoint %s at step %d; replaying to step %d, then skipping "
                    "%d batches%s", done + 1, self.trainer.max_rollbacks, divergence.describe(), restored.path,
                    restored.step, plan.skip_from_step, plan.skip_batches,
                    f" (deleted the abandoned {', '.join(f'ckpt-{step}' for step in abandoned)})" if abandoned else "")
        self.step = restored.step
        self.progress.advance(restored.step)
        if plan.skip_from_step == restored.step:
            self._apply_skips(restored.step)
        return restored.step

    def _apply_skips(self, step: int) -> None:
        """The skip schedule's entries for `step` take effect: from here on the input reads further along."""
        self.state.update_skipped_batches()
        for start, batches in self.state.skips():
            if start == step:
                log.info("skipping %d batches at step %d (a divergence rollback)", batches, step)

    def _eval_due(self, step: int) -> bool:
        return step == self.trainer.max_steps or bool(self.trainer.eval_every and step % self.trainer.eval_every == 0)

    def _log_train(self, step: int, *, steps: int, seconds: float) -> dict[str, float]:
        sums = self.train_loop.metrics.read_and_reset()  # reading syncs with the device
        steps_per_second = steps / seconds if seconds > 0 else 0.0
        metrics = {"loss": sums["loss"] / max(steps, 1), **self.task.metrics(sums),
                   "learning_rate": current_learning_rate(self.state.optimizer)}
        self.summaries.scalars(step, {
            **{f"train/{name}": value for name, value in metrics.items()},
            "perf/steps_per_second": steps_per_second,
            "perf/examples_per_second": steps_per_second * self.pipeline.global_batch_size,
        })
        self.summaries.flush()  # live TensorBoard sees every log step, not only checkpointed ones
        shown = self.task.progress_metric
        self.progress.report(step, {"loss": metrics["loss"], **({shown: metrics[shown]} if shown else {}),
                                    "lr": metrics["learning_rate"]})
        return metrics

    def evaluate(self, step: int) -> dict[str, float]:
        """The loss and the task's metrics over the whole eval split at the current weights."""
        started = time.perf_counter()
        with self.watchdog.phase("eval"):
            self.eval_loop(self.pipeline.distributed_eval_dataset(self.strategy))
        sums = self.eval_loop.metrics.read_and_reset()
        results = {"loss": sums["loss"] / sums["examples"], **self.task.metrics(sums)}
        self.summaries.scalars(step, {f"eval/{name}": value for name, value in results.items()})
        shown = ", ".join(f"{name} {value:.4f}" for name, value in results.items())
        self.progress.message(f"eval at step {step}: {shown} ({time.perf_counter() - started:.2f}s)")
        return {f"eval_{name}": value for name, value in results.items()}

    def _wait_for_saves(self) -> None:
        """Block until an in-flight async save is on disk (a hung write is the watchdog's)."""
        with self.watchdog.phase("save"):
            self.checkpointer.wait()

    def _periodic_save_due(self, step: int) -> bool:
        """The pacer's decision, agreed by every worker when it depends on clocks (time or overhead pacing)."""
        due = self.save_pacer.due(step)
        if self.save_pacer.depends_on_clock and num_workers(self.strategy) > 1:
            due = self._save_agreement.any_of([due])[0]
        return due

    @functools.cached_property
    def _save_agreement(self) -> StopAgreement:
        return StopAgreement(self.strategy)

    def _save(self, step: int) -> None:
        self.summaries.flush()
        failures_before = self.checkpointer.total_failures
        with self.watchdog.phase("save"):
            blocked = self.checkpointer.save(step)
        self.save_pacer.saved(step, blocked_seconds=blocked)
        self.summaries.scalars(step, {"perf/checkpoint_save_seconds": blocked})
        if self.checkpointer.total_failures > failures_before:
            self.summaries.scalars(step, {"faults/checkpoint_write_failures": self.checkpointer.total_failures})
        self.attempt.accounting.progress(step)
        written = self.checkpointer.last_save_bytes_written
        self.progress.message(f"saved checkpoint ckpt-{step} ({blocked:.2f}s"
                              + (f", {written / 1e6:.1f} MB written by this process)" if written is not None else ")"))
