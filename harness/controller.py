"""The outer loop: runs inner loops and does every side effect between them.

Owns: the global step as the loop sees it, when to log, evaluate, checkpoint and stop. Each inner
loop runs exactly up to the next event boundary (log, eval, checkpoint, `max_steps`), so events
happen at exact steps whatever `steps_per_loop` is. Order at a boundary: metrics -> eval ->
flush summaries -> checkpoint -> preemption check, so that a checkpoint at step `s` implies that
every summary up to `s` is on disk.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass

import tensorflow as tf

from harness.checkpointing import Checkpointer
from harness.config import TrainerConfig
from harness.data import SeekableInput
from harness.loop import EvalLoop, TrainLoop
from harness.optimization import current_learning_rate
from harness.preemption import PreemptionWatcher, StopAgreement
from harness.progress import Progress
from harness.state import TrainState
from harness.summaries import Summaries

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


def _next_multiple(step: int, every: int) -> int:
    return (step // every + 1) * every


@dataclass
class Controller:
    """Drives training from the restored step to `trainer.max_steps`."""

    strategy: tf.distribute.Strategy
    state: TrainState
    pipeline: SeekableInput
    train_loop: TrainLoop
    eval_loop: EvalLoop
    checkpointer: Checkpointer
    checkpoint_every: int
    summaries: Summaries
    progress: Progress
    watcher: PreemptionWatcher
    trainer: TrainerConfig

    def run(self) -> Outcome:
        try:
            return self._run()
        finally:
            self.progress.close()

    def _run(self) -> Outcome:
        step = int(self.state.step.numpy())
        max_steps = self.trainer.max_steps
        if step >= max_steps:
            log.info("training already complete: the checkpoint is at step %d and trainer.max_steps is %d; "
                     "nothing to do (raise trainer.max_steps to train further)", step, max_steps)
            return Outcome(Status.ALREADY_COMPLETE, step, 0, {})
        agreement = StopAgreement(self.strategy)
        iterator = self.pipeline.distributed_train_iterator(self.strategy, start_step=step)
        window_start, window_time, metrics = step, time.perf_counter(), {}
        while step < max_steps:
            num_steps = self._steps_until_next_event(step)
            self.train_loop(iterator, tf.constant(num_steps, tf.int64))
            step += num_steps
            self.progress.advance(step)
            if step % self.trainer.log_every == 0 or step == max_steps:
                metrics = self._log_train(step, steps=step - window_start, seconds=time.perf_counter() - window_time)
                window_start = step
            if self._eval_due(step):
                metrics.update(self.evaluate(step))
            stop = agreement.should_stop(self.watcher.requested)
            if step % self.checkpoint_every == 0 or step == max_steps or stop:
                self._save(step)
            if stop:
                self.checkpointer.wait()
                log.info("stopped at step %d after a stop signal; checkpoint saved; exiting with code %d",
                         step, self.watcher.exit_code)
                return Outcome(Status.PREEMPTED, step, self.watcher.exit_code, metrics)
            if window_start == step:
                window_time = time.perf_counter()
        self.checkpointer.wait()
        return Outcome(Status.COMPLETED, step, 0, metrics)

    def _steps_until_next_event(self, step: int) -> int:
        boundaries = [self.trainer.max_steps, _next_multiple(step, self.trainer.log_every),
                      _next_multiple(step, self.checkpoint_every), step + self.trainer.steps_per_loop]
        if self.trainer.eval_every:
            boundaries.append(_next_multiple(step, self.trainer.eval_every))
        return min(boundaries) - step

    def _eval_due(self, step: int) -> bool:
        return step == self.trainer.max_steps or bool(self.trainer.eval_every and step % self.trainer.eval_every == 0)

    def _log_train(self, step: int, *, steps: int, seconds: float) -> dict[str, float]:
        sums = self.train_loop.metrics.read_and_reset()  # reading syncs with the device
        steps_per_second = steps / seconds if seconds > 0 else 0.0
        metrics = {
            "loss": sums["loss"] / max(steps, 1),
            "accuracy": sums["correct"] / max(sums["examples"], 1.0),
            "learning_rate": current_learning_rate(self.state.optimizer),
        }
        self.summaries.scalars(step, {
            "train/loss": metrics["loss"], "train/accuracy": metrics["accuracy"],
            "train/learning_rate": metrics["learning_rate"], "perf/steps_per_second": steps_per_second,
            "perf/examples_per_second": steps_per_second * self.pipeline.global_batch_size,
        })
        self.summaries.flush()  # live TensorBoard sees every log step, not only checkpointed ones
        self.progress.report(step, {"loss": metrics["loss"], "acc": metrics["accuracy"],
                                    "lr": metrics["learning_rate"]})
        return metrics

    def evaluate(self, step: int) -> dict[str, float]:
        """Loss and accuracy over the whole eval split at the current weights."""
        started = time.perf_counter()
        self.eval_loop(self.pipeline.distributed_eval_dataset(self.strategy))
        sums = self.eval_loop.metrics.read_and_reset()
        results = {"eval_loss": sums["loss"] / sums["examples"], "eval_accuracy": sums["correct"] / sums["examples"]}
        self.summaries.scalars(step, {"eval/loss": results["eval_loss"], "eval/accuracy": results["eval_accuracy"]})
        self.progress.message(f"eval at step {step}: loss {results['eval_loss']:.4f}, accuracy "
                              f"{results['eval_accuracy']:.4f} ({time.perf_counter() - started:.2f}s)")
        return results

    def _save(self, step: int) -> None:
        self.summaries.flush()
        blocked = self.checkpointer.save(step)
        self.summaries.scalars(step, {"perf/checkpoint_save_seconds": blocked})
        self.progress.message(f"saved checkpoint ckpt-{step} ({blocked:.2f}s)")
