"""How checkpoints reach the disk: fsynced before they count, written once per job (the chief's); how a
restore uses memory.

In-process with small real states (fresh child processes where memory is measured); the GB-scale figures are
`scripts/benchmark.py --sections checkpoint`.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import keras
import pytest
import tensorflow as tf

from harness.checkpoint import writing
from harness.checkpoint.checkpointer import Checkpointer
from harness.checkpoint.files import list_checkpoints
from harness.checkpoint.restoring import released
from harness.checkpoint.writing import collective_read_variables
from harness.errors import CheckpointError
from harness.training.state import TrainState, create_train_state
from scripts.tooling.benchmarking import run_child


def small_state() -> TrainState:
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="dense")], name="net")
    return create_train_state(model, keras.optimizers.Adam())


def chief_checkpointer(directory: Path, *, max_to_keep: int, async_save: bool,
                       state: TrainState | None = None) -> tuple[TrainState, Checkpointer]:
    """`state` (default: a small one) and the chief's checkpointer of it, saving to `directory`."""
    state = state or small_state()
    return state, Checkpointer(state, directory=str(directory), max_to_keep=max_to_keep, keep_every_hours=None,
                               async_save=async_save, is_chief=True)


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str | None]]:
    """Every fsync the checkpoint writing module makes: (path, the checkpoint recorded as latest at that moment)."""
    calls: list[tuple[str, str | None]] = []
    real_fsync = os.fsync

    def recording_fsync(descriptor: int) -> None:
        path = os.readlink(f"/proc/self/fd/{descriptor}")
        directory = path if os.path.isdir(path) else os.path.dirname(path)
        calls.append((path, tf.train.latest_checkpoint(directory)))
        real_fsync(descriptor)

    monkeypatch.setattr(writing.os, "fsync", recording_fsync)
    return calls


@pytest.mark.parametrize("async_save", [False, True])
def test_every_file_is_fsynced_before_the_checkpoint_is_recorded_as_latest(
        tmp_path: Path, fsyncs: list[tuple[str, str | None]], async_save: bool) -> None:
    directory = tmp_path / "checkpoints"
    state, checkpointer = chief_checkpointer(directory, max_to_keep=2, async_save=async_save)
    for step in (10, 20):
        state.step.assign(step)
        checkpointer.save(step)
        checkpointer.wait()
        prefix = str(directory / f"ckpt-{step}")
        synced = {path for path, _ in fsyncs}
        assert {f"{prefix}.index", f"{prefix}.data-00000-of-00001", str(directory)} <= synced
        recorded_while_syncing = {latest for path, latest in fsyncs if path.startswith(prefix)}
        assert prefix not in recorded_while_syncing, "recorded as latest before it was on disk"
        assert tf.train.latest_checkpoint(str(directory)) == prefix
        if not async_save:  # what the controller's "saved checkpoint" line reports
            files = (directory / f"ckpt-{step}.index", directory / f"ckpt-{step}.data-00000-of-00001")
            assert checkpointer.last_save_bytes_written >= sum(path.stat().st_size for path in files)
        fsyncs.clear()


def _open_checkpoint_files() -> list[str]:
    targets = []
    for descriptor in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        except OSError:  # closed meanwhile (listdir's own descriptor)
            continue
    return [target for target in targets if "ckpt-" in target]


def test_a_sync_save_frees_the_checkpoint_it_rotates_out_on_a_background_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Freeing a deleted file's blocks takes ~0.2 s per GB: not while training waits for a sync save."""
    handed_over: list[str] = []
    submit = writing._closer.submit

    def recording_submit(function: Callable[[int], None], descriptor: int) -> Future:
        handed_over.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        return submit(function, descriptor)

    monkeypatch.setattr(writing._closer, "submit", recording_submit)
    directory = tmp_path / "checkpoints"
    state, checkpointer = chief_checkpointer(directory, max_to_keep=1, async_save=False)
    for step in (10, 20):
        state.step.assign(step)
        checkpointer.save(step)
    assert sorted(path.name for path in directory.glob("ckpt-*")) == ["ckpt-20.data-00000-of-00001",
                                                                      "ckpt-20.index"]
    assert handed_over == [f"{directory}/ckpt-10.data-00000-of-00001 (deleted)"]
    submit(lambda: None).result()  # the background closes are done
    assert _open_checkpoint_files() == []


def test_a_non_chief_writes_nothing_when_every_variable_is_mirrored(
        tmp_path: Path, fsyncs: list[tuple[str, str | None]], monkeypatch: pytest.MonkeyPatch) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    state = small_state()
    checkpointer = Checkpointer(state, directory=str(tmp_path / "checkpoints"), max_to_keep=2, keep_every_hours=None,
                                async_save=False, is_chief=False)
    for step in (10, 20):
        state.step.assign(step)
        checkpointer.save(step)
    assert fsyncs == [], "a non-chief wrote a checkpoint"
    assert checkpointer.last_save_bytes_written == 0
    assert not list(tmpdir.iterdir()) and not (tmp_path / "checkpoints").exists()


def test_sync_on_read_variables_are_the_ones_that_need_every_worker() -> None:
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        mirrored = tf.Variable(1.0)
        summed = tf.Variable(0.0, synchronization=tf.VariableSynchronization.ON_READ,
                             aggregation=tf.VariableAggregation.SUM)
    plain = tf.Variable(2.0)
    tree = {"model": {"dense": {"kernel": mirrored}}, "metrics": {"total": summed}, "step": plain}
    assert collective_read_variables(tree) == ["metrics/total"]
    assert collective_read_variables(writing.backing_variables(small_state().checkpoint_items())) == []


@pytest.mark.parametrize("recorded_before", [True, False])
def test_a_checkpoint_killed_before_it_was_recorded_is_restored_then_rotated_like_the_others(
        tmp_path: Path, recorded_before: bool) -> None:
    """A kill between the fsync and the manager's record leaves a complete ckpt-11 that the state file
    does not list: the next run resumes from it, and max_to_keep deletes it in turn."""
    directory = tmp_path / "checkpoints"
    state = small_state()
    writer = Checkpointer(state, directory=str(directory), max_to_keep=1, keep_every_hours=None, async_save=False,
                          is_chief=True)
    if recorded_before:
        state.step.assign(10)
        writer.save(10)
    state.step.assign(11)
    writer._checkpoint.write(str(directory / "ckpt-11"))  # written (as a save writes it), never recorded
    assert tf.train.latest_checkpoint(str(directory)) == (str(directory / "ckpt-10") if recorded_before else None)

    successor_state = small_state()
    successor = Checkpointer(successor_state, directory=str(directory), max_to_keep=1, keep_every_hours=None,
                             async_save=False, is_chief=True)
    assert successor.restore_latest().step == 11
    for step in (12, 13):
        successor_state.step.assign(step)
        successor.save(step)
    assert sorted(p.name for p in directory.iterdir()) == ["checkpoint", "ckpt-13.data-00000-of-00001",
                                                          "ckpt-13.index"]


def _steps_on_disk(directory: Path) -> list[int]:
    return sorted(step for step, _ in list_checkpoints(str(directory)))


@pytest.mark.parametrize("restarted_before_rollback", [False, True])
def test_checkpoints_a_rollback_deleted_no_longer_count_toward_max_to_keep(
        tmp_path: Path, fsyncs: list[tuple[str, str | None]], restarted_before_rollback: bool) -> None:
    """A rollback to ckpt-200 deletes the abandoned ckpt-300 and ckpt-400, durably (the directory is fsynced:
    they must not come back after a power loss). Still listed by the manager (in memory, or in the state file
    a restarted run reads), they would make the next save rotate out the restored ckpt-200 while only two
    checkpoints exist."""
    directory = tmp_path / "checkpoints"
    state, writer = chief_checkpointer(directory, max_to_keep=3, async_save=False)
    for step in (100, 200, 300, 400):
        state.step.assign(step)
        writer.save(step)
    if restarted_before_rollback:
        state, writer = chief_checkpointer(directory, max_to_keep=3, async_save=False)
    assert writer.restore_latest(max_step=250).step == 200
    fsyncs.clear()
    assert writer.delete_newer_than(200) == [400, 300]
    assert [path for path, _ in fsyncs] == [os.path.realpath(directory)]
    assert tf.train.latest_checkpoint(str(directory)) == str(directory / "ckpt-200")

    state.step.assign(237)  # where the replay skips batches: a step no save used before
    writer.save(237)
    assert _steps_on_disk(directory) == [200, 237]
    for step in (300, 400):
        state.step.assign(step)
        writer.save(step)
    assert _steps_on_disk(directory) == [237, 300, 400]
    assert tf.train.latest_checkpoint(str(directory)) == str(directory / "ckpt-400")


def test_a_rollback_to_a_checkpoint_kept_by_keep_every_hours_keeps_it(tmp_path: Path) -> None:
    """The restored ckpt-200 was rotated out of the manager's list but kept by `keep_every_hours`; the rollback
    deletes ckpt-300, the only one listed. ckpt-200 becomes latest and stays kept: no manager built from the
    state file would rotate it out."""
    directory = tmp_path / "checkpoints"
    state = small_state()

    def checkpointer() -> Checkpointer:
        return Checkpointer(state, directory=str(directory), max_to_keep=1, keep_every_hours=1e-9, async_save=False,
                            is_chief=True)

    writer = checkpointer()
    for step in (100, 200, 300):
        state.step.assign(step)
        writer.save(step)
    assert writer.restore_latest(max_step=250).step == 200
    assert writer.delete_newer_than(200) == [300]
    assert tf.train.latest_checkpoint(str(directory)) == str(directory / "ckpt-200")
    assert checkpointer().manager.checkpoints == []
    assert _steps_on_disk(directory) == [100, 200]


# ---------------------------------------------------------------------------------------------
# Restoring: the large variables' buffers are freed first, and every one gets a value back
# ---------------------------------------------------------------------------------------------
def wide_state(width: int = 1024) -> TrainState:
    """Kernels of 1024 x `width` float32 (4 MB at 1024) and their Adam slots: above RELEASE_MIN_BYTES."""
    model = keras.Sequential([keras.Input((1024,)), keras.layers.Dense(width, name="dense"),
                              keras.layers.Dense(10, name="logits")], name="net")
    state = create_train_state(model, keras.optimizers.Adam())
    state.optimizer.build(model.trainable_variables)
    return state


def _state_values(state: TrainState) -> dict[str, object]:
    return {variable.path: variable.numpy() for variable in [*state.model.weights, *state.optimizer.variables]}


def _perturb(state: TrainState) -> None:
    for variable in [*state.model.weights, *state.optimizer.variables]:
        variable.assign(variable + tf.ones_like(variable))


def test_a_restore_holds_one_copy_of_the_state_not_two(tmp_path: Path) -> None:
    """TensorFlow reads into new tensors; with the old values still held, the peak would be twice the state. A
    fresh process: memory that earlier tests freed (TensorFlow keeps it) would hide the second copy."""
    script = f"""
from pathlib import Path
from scripts.tooling.benchmarking import restore_or_read, state_size_bytes
from tests.test_checkpoint_io import chief_checkpointer, wide_state
state, checkpointer = chief_checkpointer(Path({str(tmp_path)!r}), max_to_keep=1, async_save=False,
                                         state=wide_state(width=16384))  # a 64 MB kernel, two 64 MB Adam slots
state.step.assign(1)
checkpointer.save(1)
_, added_bytes = restore_or_read("restore", checkpointer, ())
assert int(state.step.numpy()) == 1
print("added", added_bytes / state_size_bytes(state))
"""
    added = float(_python_child(script).split("added")[-1])
    assert added < 0.5, f"the restore added {added:.2f}x the state at its peak"


def test_a_restore_into_a_different_model_reports_real_shapes_and_falls_back_past_a_corrupted_one(
        tmp_path: Path) -> None:
    """The released variables' shapes are back for the report; a corrupted newest checkpoint is skipped and the
    older one assigns every variable."""
    state, checkpointer = chief_checkpointer(tmp_path, max_to_keep=2, async_save=False, state=wide_state())
    state.step.assign(1)
    checkpointer.save(1)
    saved = _state_values(state)
    _perturb(state)
    state.step.assign(2)
    checkpointer.save(2)
    data = tmp_path / "ckpt-2.data-00000-of-00001"
    content = bytearray(data.read_bytes())
    content[len(content) // 2] ^= 0xFF
    data.write_bytes(bytes(content))
    assert checkpointer.restore_latest().step == 1
    restored = _state_values(state)
    assert all((restored[name] == value).all() for name, value in saved.items())

    other, reader = chief_checkpointer(tmp_path, max_to_keep=2, async_save=False, state=wide_state(width=1100))
    with pytest.raises(CheckpointError, match=re.escape("model/dense/kernel: checkpoint [1024, 1024] float32 vs "
                                                        "model [1024, 1100] float32")):
        reader.restore_latest()
    assert all(tuple(variable.value.read_value().shape) == tuple(variable.shape)
               for variable in [*other.model.weights, *other.optimizer.variables])


def test_a_checkpoint_of_another_dtype_is_a_mismatch_not_damage(tmp_path: Path) -> None:
    """TensorFlow reports it as an InvalidArgumentError, like a corrupted file: it must not be skipped as unreadable
    (and the run refused for having no readable checkpoint) but reported like any other difference."""
    _, writer = chief_checkpointer(tmp_path, max_to_keep=1, async_save=False)
    writer.save(1)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="dense", dtype="float64")], name="net")
    _, reader = chief_checkpointer(tmp_path, max_to_keep=1, async_save=False,
                                   state=create_train_state(model, keras.optimizers.Adam()))
    with pytest.raises(CheckpointError, match=r"model/dense/kernel: checkpoint \[4, 3\] float32 vs model \[4, 3\] "
                                              r"float64(.|\n)*Nothing on disk was changed"):
        reader.restore_latest()


def test_a_restore_that_assigned_nothing_is_refused() -> None:
    variable = tf.Variable(tf.ones([512, 1024]))
    expected = r"left 1 variables without a value of their shape \(Variable:0\)"
    with pytest.raises(CheckpointError, match=expected), released([variable]):
        pass
    assert (variable.numpy() == 0).all() and variable.numpy().shape == (512, 1024)


def test_mirrored_variables_on_two_devices_are_released_and_restored(tmp_path: Path) -> None:
    """`tf.distribute` variables restore every device's copy through `tf.Variable.assign`, which checks the current
    shape at run time: each copy is released too, and gets the checkpoint's value (a child process: logical CPU
    devices must be configured before TensorFlow starts)."""
    script = f"""
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from pathlib import Path
from scripts.tooling.benchmarking import restore_or_read, state_size_bytes
from tests.test_checkpoint_io import _perturb, _state_values, chief_checkpointer, wide_state
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    state = wide_state(width=8192)  # per device: a 32 MB kernel and two 32 MB Adam slots
_, checkpointer = chief_checkpointer(Path({str(tmp_path)!r}), max_to_keep=1, async_save=False, state=state)
state.step.assign(1)
checkpointer.save(1)
saved = _state_values(state)
# Measured before any perturbation: its temporaries, kept by TensorFlow's allocator, would hide a copy.
_, added_bytes = restore_or_read("restore", checkpointer, ())
assert int(state.step.numpy()) == 1
print("added", added_bytes / (2 * state_size_bytes(state)))
_perturb(state)
assert checkpointer.restore_latest().step == 1
kernel = state.model.get_layer("dense").kernel.value
assert len(kernel.values) == 2 and kernel.values[0].device != kernel.values[1].device
for variable in [*state.model.weights, *state.optimizer.variables]:
    for component in variable.value.values:
        assert (component.numpy() == saved[variable.path]).all(), variable.path
"""
    added = float(_python_child(script).split("added")[-1])
    assert added < 0.25, f"the restore added {added:.2f}x the state's copies at its peak (0.5x: one copy)"


def _python_child(script: str) -> str:
    """Run `script` in a fresh Python process from the project root; its stdout."""
    return run_child([sys.executable, "-c", script], timeout=300)[1]
