"""harness/control/: the controller and its actions, run in-process through `train.train(cfg)`.

What a run leaves on disk is checked (checkpoints, TensorBoard points read back with TensorBoard's
loader), as Orbit's controller tests do. Signals, crashes and exit codes are what the subprocess
tests (test_fault_tolerance.py, test_operations.py) are for.
"""

from __future__ import annotations

from pathlib import Path

import keras
import pytest
import tensorflow as tf

import train
from harness.checkpoint.checkpointer import Checkpointer
from harness.checkpoint.files import list_checkpoints
from harness.config.schema import WatchdogConfig
from harness.control.actions import (
    ApplyBatchSkips,
    Evaluate,
    FinishWrites,
    LogTrainMetrics,
    RollBackOnDivergence,
    SaveCheckpoint,
    StopOnLostLease,
    StopOnSignal,
    saves_landed_on_error,
)
from harness.control.controller import Status
from harness.errors import DataError
from harness.operations.watchdog import Watchdog
from harness.training.state import create_train_state
from tests.conftest import compose, event_scalars


def _train_in_process(run_dir: Path, *overrides: str):
    return train.train(compose(f"run_dir={run_dir}", "export.enabled=false", "lease.enabled=false", *overrides))


@pytest.mark.parametrize("steps_per_loop", [7, 100])
def test_every_action_happens_at_its_exact_step_whatever_steps_per_loop(tmp_path: Path, steps_per_loop: int) -> None:
    outcome = _train_in_process(tmp_path, "trainer.max_steps=20", f"trainer.steps_per_loop={steps_per_loop}",
                                "trainer.log_every=5", "trainer.eval_every=6", "checkpoint.every_steps=8",
                                "checkpoint.max_to_keep=10")
    assert (outcome.status, outcome.step, outcome.exit_code) == (Status.COMPLETED, 20, 0)
    assert sorted(step for step, _ in list_checkpoints(str(tmp_path / "checkpoints"))) == [8, 16, 20]
    scalars = event_scalars(tmp_path / "tensorboard")
    assert [step for step, _ in scalars["train/loss"]] == [5, 10, 15, 20]
    assert [step for step, _ in scalars["eval/loss"]] == [6, 12, 18, 20]
    assert [step for step, _ in scalars["perf/checkpoint_save_seconds"]] == [8, 16, 20]
    assert {"loss", "eval_loss", "eval_accuracy"} <= set(outcome.final_metrics)


def test_a_completed_run_run_again_does_nothing(tmp_path: Path) -> None:
    first = _train_in_process(tmp_path, "trainer.max_steps=10", "trainer.log_every=5")
    again = _train_in_process(tmp_path, "trainer.max_steps=10", "trainer.log_every=5")
    assert (first.status, again.status, again.step) == (Status.COMPLETED, Status.ALREADY_COMPLETE, 10)
    assert max(step for step, _ in list_checkpoints(str(tmp_path / "checkpoints"))) == 10


def test_the_actions_run_in_the_order_that_makes_every_checkpoint_good() -> None:
    """Reordering them breaks guarantees the docstring of actions.py states; this pins the order."""
    from harness.control import actions

    order = [RollBackOnDivergence, StopOnLostLease, LogTrainMetrics, Evaluate, ApplyBatchSkips, SaveCheckpoint,
             StopOnSignal, FinishWrites]
    signature = actions.standard_actions.__code__.co_varnames[:actions.standard_actions.__code__.co_kwonlyargcount]
    built = actions.standard_actions(**{name: None for name in signature})
    assert [type(action) for action in built] == order


@pytest.mark.parametrize("error", [DataError("a shard went bad mid-run"), RuntimeError("a bug")])
def test_an_error_that_ends_the_run_lets_the_async_save_in_flight_reach_the_disk(
        tmp_path: Path, error: Exception) -> None:
    """train.py leaves through `os._exit`, which drops TensorFlow's writer thread: the save in flight when an
    error ends the run must be on disk (and recorded) by the time the error leaves the controller's block."""
    model = keras.Sequential([keras.Input((2048,)), keras.layers.Dense(4096, name="dense")], name="net")
    state = create_train_state(model, keras.optimizers.Adam())  # ~100 MB with Adam's slots: a write that takes time
    directory = tmp_path / "checkpoints"
    writer = Checkpointer(state, directory=str(directory), max_to_keep=3, keep_every_hours=None, async_save=True,
                          is_chief=True)
    with pytest.raises(type(error)), saves_landed_on_error(writer, Watchdog(WatchdogConfig())):
        state.step.assign(20)
        writer.save(20)
        raise error
    assert tf.train.latest_checkpoint(str(directory)) == str(directory / "ckpt-20")
    assert [step for step, _ in list_checkpoints(str(directory))] == [20]


def test_a_divergence_in_the_loop_that_lost_the_lease_is_not_rolled_back() -> None:
    """Another run owns checkpoint.dir: a rollback's restore would remove that run's in-flight writes (and
    non-chiefs would skip the lease action after it). The lease action, next, stops every worker instead."""
    from harness.config.schema import TrainerConfig
    from harness.control.actions import Boundary

    rollback = RollBackOnDivergence(TrainerConfig(), *([None] * 6))  # it must touch none of them

    def diverged(*, lease_lost: bool) -> Boundary:
        return Boundary(start_step=0, step=10, losses=[float("nan")] * 10, train_seconds=0.1, stop_requested=False,
                        lease_lost=lease_lost, is_final=False)

    boundary = diverged(lease_lost=True)
    rollback(boundary)
    assert not boundary.rolled_back and boundary.step == 10
    with pytest.raises(AttributeError):  # with the lease, it acts on the divergence (and its collaborators)
        rollback(diverged(lease_lost=False))
