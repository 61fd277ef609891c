"""What happens at a boundary between inner loops: one small action per side effect, run in order.

Owns: the side effects of the outer loop, as callables like Orbit's `actions` (each is handed the
`Boundary` an inner loop ended at and may record on it what it did), and `standard_actions`, their
order. The order is the guarantee: roll back on divergence -> stop on a lost lease -> log ->
evaluate -> apply a rollback's batch skip -> checkpoint -> stop on a signal -> wait for the final
write. So a checkpoint at step `s` is written after the summaries up to `s` are flushed and after
every step up to `s` passed the divergence check: every checkpoint is a good one to roll back to.
Each action also names the next step it needs a boundary at (`next_step`), so the controller ends
inner loops exactly there. And an error that ends the run lets an async save in flight land first
(`saves_landed_on_error`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import tensorflow as tf

from harness.checkpoint.checkpointer import Checkpointer
from harness.checkpoint.pacing import SavePacer
from harness.config.schema import TrainerConfig
from harness.control.progress import Progress
from harness.control.summaries import Summaries
from harness.data.pipeline import SeekableInput
from harness.distributed.strategy import num_workers
from harness.errors import DivergedError, HarnessError, LeaseConflictError
from harness.operations.attempt import Attempt
from harness.operations.preemption import StopAgreement
from harness.operations.watchdog import Watchdog
from harness.tasks import Task
from harness.training.divergence import first_divergence, plan_rollback
from harness.training.loop import Accumulators, EvalLoop
from harness.training.optimization import current_learning_rate
from harness.training.state import TrainState

log = logging.getLogger(__name__)

# The watchdog's phase for waiting on an async save's background write: timed apart from "save" (what a
# save blocks training, ~0 when async), or the final wait for a big write would be judged by that.
WRITE_PHASE = "checkpoint write"


@dataclass
class Boundary:
    """Where one inner loop ended, handed to every action in order; actions record what they did."""

    start_step: int  # the global step the inner loop started from
    step: int  # the global step reached (a rollback moves it back)
    losses: list[float]  # the loss of each step run, in order
    train_seconds: float  # wall time of the inner loop (what steps/s is computed from)
    stop_requested: bool  # a stop signal arrived on some worker (agreed by every worker)
    lease_lost: bool  # the chief lost its lease on checkpoint.dir (agreed by every worker)
    is_final: bool  # the step reached is trainer.max_steps
    rolled_back: bool = False  # the loop's steps were abandoned for an earlier checkpoint
    input_moved: bool = False  # the input must restart from the state's batch index
    skip_began: bool = False  # a rollback's batch skip took effect here (saved at once)
    stopped_with_exit_code: int | None = None  # set by an action that ends the run
    metrics: dict[str, float] = field(default_factory=dict)  # logged train and eval metrics


class Action:
    """A side effect at boundaries: `__call__` does it; `next_step` asks for a boundary at a step."""

    def next_step(self, step: int) -> int | None:
        """The first step after `step` at which this action needs a boundary; None for no constraint."""
        return None

    def __call__(self, boundary: Boundary) -> None:
        raise NotImplementedError


def _next_multiple(step: int, every: int) -> int:
    return (step // every + 1) * every


@dataclass
class RollBackOnDivergence(Action):
    """A NaN/Inf loss, or one above `trainer.loss_upper_bound`: restore the newest checkpoint at or
    before the first bad step, delete newer ones, and skip the batches that led there (at most
    `trainer.max_rollbacks` times, then `DivergedError`)."""

    trainer: TrainerConfig
    state: TrainState
    checkpointer: Checkpointer
    train_metrics: Accumulators
    summaries: Summaries
    attempt: Attempt
    watchdog: Watchdog

    def __call__(self, boundary: Boundary) -> None:
        if boundary.lease_lost:
            return  # another run owns checkpoint.dir: restoring would remove its in-flight writes; just stop
        divergence = first_divergence(boundary.losses, first_step=boundary.start_step,
                                      upper_bound=self.trainer.loss_upper_bound)
        if divergence is None:
            return
        plan = plan_rollback(divergence, skip_batches=self.trainer.rollback_skip_batches)
        done = int(self.state.rollbacks.numpy())
        if done >= self.trainer.max_rollbacks:
            self.summaries.scalars(divergence.step, {"faults/diverged_loss": divergence.loss})
            raise DivergedError(
                f"Training diverged: {divergence.describe()}, after {done} rollbacks already "
                f"(trainer.max_rollbacks={self.trainer.max_rollbacks}). Stopping without saving; the newest "
                f"checkpoint (step <= {divergence.step}) is intact. Lower optimizer.learning_rate, add "
                "optimizer.global_clipnorm, or check the data around this step, then rerun (raise "
                "trainer.max_rollbacks to keep trying).")
        with self.watchdog.phase(WRITE_PHASE):  # an async write still in flight
            self.checkpointer.discard_pending_write()
        skips = [*self.state.skips(), (plan.skip_from_step, plan.skip_batches)]  # not restored: what we know now
        restored = self.checkpointer.restore_latest(max_step=plan.skip_from_step)
        if restored.step is None:
            raise DivergedError(
                f"Training diverged: {divergence.describe()}, and no checkpoint at or before step "
                f"{plan.skip_from_step} exists to roll back to (trainer.rollback_skip_batches={plan.skip_batches}). "
                "Stopping; lower checkpoint.every_steps so that a rollback has somewhere to go, or fix the cause "
                "(learning rate, data).")
        abandoned = self.checkpointer.delete_newer_than(restored.step)  # before anything of the new trajectory
        self.state.rollbacks.assign(done + 1)
        self.state.set_skips(skips)
        self.train_metrics.read_and_reset()  # sums of the abandoned steps
        self.summaries.restart_at(restored.step)  # the abandoned steps' points vanish from TensorBoard
        self.summaries.scalars(divergence.step, {"faults/rollbacks": done + 1, "faults/diverged_loss": divergence.loss})
        self.attempt.accounting.rollback()
        log.warning("rollback %d of %d: %s; restored checkpoint %s at step %d; replaying to step %d, then skipping "
                    "%d batches%s", done + 1, self.trainer.max_rollbacks, divergence.describe(), restored.path,
                    restored.step, plan.skip_from_step, plan.skip_batches,
                    f" (deleted the abandoned {', '.join(f'ckpt-{step}' for step in abandoned)})" if abandoned else "")
        boundary.step, boundary.rolled_back, boundary.input_moved = restored.step, True, True
        if plan.skip_from_step == restored.step:
            apply_skips(self.state, restored.step)


@dataclass
class StopOnLostLease(Action):
    """Another run took over checkpoint.dir: every worker stops at once, writing nothing."""

    attempt: Attempt

    def __call__(self, boundary: Boundary) -> None:
        if boundary.lease_lost and not boundary.rolled_back:
            lease = self.attempt.lease
            raise LeaseConflictError(lease.lost_message() if lease else "The chief lost its lease on "
                                     "checkpoint.dir; every worker stops without writing.")


@dataclass
class LogTrainMetrics(Action):
    """Every `trainer.log_every` steps and at the end: the window's train metrics and steps/s to
    TensorBoard (flushed, so live TensorBoard sees them) and the progress display; the step is
    recorded in the run record before it is shown."""

    trainer: TrainerConfig
    task: Task
    state: TrainState
    train_metrics: Accumulators
    pipeline: SeekableInput  # its global batch size turns steps/s into examples/s
    summaries: Summaries
    progress: Progress
    attempt: Attempt
    _window_steps: int = 0
    _window_seconds: float = 0.0

    def next_step(self, step: int) -> int:
        return _next_multiple(step, self.trainer.log_every)

    def __call__(self, boundary: Boundary) -> None:
        if boundary.rolled_back:  # the window's sums were discarded with the abandoned steps
            self._window_steps, self._window_seconds = 0, 0.0
            return
        self._window_steps += boundary.step - boundary.start_step
        self._window_seconds += boundary.train_seconds
        if not (boundary.step % self.trainer.log_every == 0 or boundary.is_final):
            return
        steps, seconds = self._window_steps, self._window_seconds
        self._window_steps, self._window_seconds = 0, 0.0
        self.attempt.accounting.progress(boundary.step, seconds_per_step=seconds / max(steps, 1))
        sums = self.train_metrics.read_and_reset()  # reading syncs with the device
        steps_per_second = steps / seconds if seconds > 0 else 0.0
        metrics = {"loss": sums["loss"] / max(steps, 1), **self.task.metrics(sums),
                   "learning_rate": current_learning_rate(self.state.optimizer)}
        self.summaries.scalars(boundary.step, {
            **{f"train/{name}": value for name, value in metrics.items()},
            "perf/steps_per_second": steps_per_second,
            "perf/examples_per_second": steps_per_second * self.pipeline.global_batch_size,
        })
        self.summaries.flush()
        shown = self.task.progress_metric
        self.progress.report(boundary.step, {"loss": metrics["loss"], **({shown: metrics[shown]} if shown else {}),
                                             "lr": metrics["learning_rate"]})
        boundary.metrics.update(metrics)


@dataclass
class Evaluate(Action):
    """Every `trainer.eval_every` steps and at the end: loss and the task's metrics over the whole
    eval split, to TensorBoard (`eval/...`) and the progress display."""

    trainer: TrainerConfig
    task: Task
    strategy: tf.distribute.Strategy
    pipeline: SeekableInput
    eval_loop: EvalLoop
    summaries: Summaries
    progress: Progress
    watchdog: Watchdog

    def next_step(self, step: int) -> int | None:
        return _next_multiple(step, self.trainer.eval_every) if self.trainer.eval_every else None

    def __call__(self, boundary: Boundary) -> None:
        every = self.trainer.eval_every
        if boundary.rolled_back or not (boundary.is_final or (every and boundary.step % every == 0)):
            return
        started = time.perf_counter()
        with self.watchdog.phase("eval"):
            self.eval_loop(self.pipeline.distributed_eval_dataset(self.strategy))
        sums = self.eval_loop.metrics.read_and_reset()
        results = {"loss": sums["loss"] / sums["examples"], **self.task.metrics(sums)}
        self.summaries.scalars(boundary.step, {f"eval/{name}": value for name, value in results.items()})
        shown = ", ".join(f"{name} {value:.4f}" for name, value in results.items())
        self.progress.message(f"eval at step {boundary.step}: {shown} ({time.perf_counter() - started:.2f}s)")
        boundary.metrics.update({f"eval_{name}": value for name, value in results.items()})


@dataclass
class ApplyBatchSkips(Action):
    """At the step a rollback planned to skip from: the input moves past the skipped batches (and the
    checkpoint action saves at once, so a restart skips them too)."""

    state: TrainState
    _starts: frozenset[int] | None = None  # the schedule's start steps; only a rollback changes them

    def next_step(self, step: int) -> int | None:
        return min((start for start in self._skip_starts() if start > step), default=None)

    def __call__(self, boundary: Boundary) -> None:
        if boundary.rolled_back:
            self._starts = None
            return
        if boundary.step in self._skip_starts():
            apply_skips(self.state, boundary.step)
            boundary.skip_began, boundary.input_moved = True, True

    def _skip_starts(self) -> frozenset[int]:
        if self._starts is None:  # read from the device once per rollback, not once per inner loop
            self._starts = frozenset(start for start, _ in self.state.skips())
        return self._starts


def apply_skips(state: TrainState, step: int) -> None:
    """The skip schedule's entries for `step` take effect: from here on the input reads further along."""
    state.update_skipped_batches()
    for start, batches in state.skips():
        if start == step:
            log.info("skipping %d batches at step %d (a divergence rollback)", batches, step)


@dataclass
class SaveCheckpoint(Action):
    """When the pacer says so (every_steps / every_seconds / max_overhead; the chief's pacer for every
    worker when it depends on clocks), at the end, on a stop signal and where a batch skip began. Summaries are
    flushed first."""

    strategy: tf.distribute.Strategy
    checkpointer: Checkpointer
    pacer: SavePacer
    summaries: Summaries
    progress: Progress
    attempt: Attempt
    watchdog: Watchdog

    def next_step(self, step: int) -> int:
        return self.pacer.next_due_step(step, use_local_clock=num_workers(self.strategy) == 1)

    def __call__(self, boundary: Boundary) -> None:
        if boundary.rolled_back:
            return
        due = self._periodic_save_due(boundary.step)  # first: may be collective, so every worker asks
        if not (due or boundary.is_final or boundary.stop_requested or boundary.skip_began):
            return
        step = boundary.step
        self.summaries.flush()
        failures_before = self.checkpointer.total_failures
        with self.watchdog.phase("save"):
            blocked = self.checkpointer.save(step)
        self.pacer.saved(step, blocked_seconds=blocked)
        self.summaries.scalars(step, {"perf/checkpoint_save_seconds": blocked})
        if self.checkpointer.total_failures > failures_before:
            self.summaries.scalars(step, {"faults/checkpoint_write_failures": self.checkpointer.total_failures})
        self.attempt.accounting.progress(step)
        written = self.checkpointer.last_save_bytes_written
        self.progress.message(f"saved checkpoint ckpt-{step} ({blocked:.2f}s"
                              + (f", {written / 1e6:.1f} MB written by this process)" if written is not None else ")"))

    def _periodic_save_due(self, step: int) -> bool:
        due = self.pacer.due(step)
        if self.pacer.depends_on_clock and num_workers(self.strategy) > 1:
            # The chief's pacer decides: it alone writes, so only its saves take time (checkpoint.max_overhead
            # stretches nothing on a worker whose saves return at once).
            due = self._agreement.chiefs([due], is_chief=self.checkpointer.is_chief)[0]
        return due

    @functools.cached_property
    def _agreement(self) -> StopAgreement:
        return StopAgreement(self.strategy)


@dataclass
class StopOnSignal(Action):
    """A stop signal (preemption): once the checkpoint action's save of this step is on disk, the run
    ends with `preemption.exit_code`."""

    checkpointer: Checkpointer
    watchdog: Watchdog
    exit_code: int

    def __call__(self, boundary: Boundary) -> None:
        if boundary.rolled_back or not boundary.stop_requested:
            return
        wait_for_saves(self.checkpointer, self.watchdog)
        log.info("stopped at step %d after a stop signal; checkpoint saved; exiting with code %d",
                 boundary.step, self.exit_code)
        boundary.stopped_with_exit_code = self.exit_code


@dataclass
class FinishWrites(Action):
    """At `max_steps`: the run completes only once the final checkpoint is on disk (async saves)."""

    checkpointer: Checkpointer
    watchdog: Watchdog

    def __call__(self, boundary: Boundary) -> None:
        if boundary.is_final and not boundary.rolled_back:
            wait_for_saves(self.checkpointer, self.watchdog)


def wait_for_saves(checkpointer: Checkpointer, watchdog: Watchdog) -> None:
    """Block until an in-flight async save is on disk (a hung write is the watchdog's)."""
    with watchdog.phase(WRITE_PHASE):
        checkpointer.wait()


@contextlib.contextmanager
def saves_landed_on_error(checkpointer: Checkpointer, watchdog: Watchdog) -> Iterator[None]:
    """An error that ends the run lets an async save already in flight reach the disk first.

    The process then leaves through `os._exit`, which would drop TensorFlow's writer thread mid-write
    and lose up to one save interval. The write is not retried if it fails (the state moved on), and
    its failure does not replace the error. Not after a lost lease: another run owns the directory.
    """
    try:
        yield
    except LeaseConflictError:
        raise
    except Exception:
        with watchdog.phase(WRITE_PHASE), contextlib.suppress(HarnessError):
            checkpointer.discard_pending_write()
        raise


def standard_actions(*, strategy: tf.distribute.Strategy, task: Task, state: TrainState, pipeline: SeekableInput,
                     train_metrics: Accumulators, eval_loop: EvalLoop, checkpointer: Checkpointer, pacer: SavePacer,
                     summaries: Summaries, progress: Progress, trainer: TrainerConfig, watchdog: Watchdog,
                     attempt: Attempt, stop_exit_code: int) -> Sequence[Action]:
    """The harness's actions in the order that makes every checkpoint a good one (module docstring)."""
    return (
        RollBackOnDivergence(trainer, state, checkpointer, train_metrics, summaries, attempt, watchdog),
        StopOnLostLease(attempt),
        LogTrainMetrics(trainer, task, state, train_metrics, pipeline, summaries, progress, attempt),
        Evaluate(trainer, task, strategy, pipeline, eval_loop, summaries, progress, watchdog),
        ApplyBatchSkips(state),
        SaveCheckpoint(strategy, checkpointer, pacer, summaries, progress, attempt, watchdog),
        StopOnSignal(checkpointer, watchdog, stop_exit_code),
        FinishWrites(checkpointer, watchdog),
    )
