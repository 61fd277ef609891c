"""Shared-filesystem realities, injected for real: a second live process on the same run, a frozen
holder taken over, a full disk and a filesystem turned read-only in the middle of a run, and an
unwritable checkpoint directory at start. Nothing saved may be lost or half-written.

The disk and permission faults use a tiny tmpfs mounted for the test (root with CAP_SYS_ADMIN, as
in CI): a full filesystem gives ENOSPC, a read-only remount EROFS, for root too.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.checkpoint.contents import read_provenance
from harness.checkpoint.files import list_checkpoints
from harness.errors import ExitCode
from tests.background import BackgroundRun
from tests.conftest import assert_ok, checkpoint_values, event_scalars, run_train, subprocess_env, train_command

pytestmark = pytest.mark.slow

FAST_LEASE = ("lease.renew_seconds=1", "lease.expiry_seconds=4")
LONG_RUN = ("trainer.max_steps=1000000", "trainer.steps_per_loop=5", "trainer.log_every=5", "trainer.eval_every=0",
            "checkpoint.every_steps=10", *FAST_LEASE)


def start(run_dir: Path, *overrides: str) -> BackgroundRun:
    return BackgroundRun(train_command(run_dir, *overrides), env=subprocess_env())


def steps_reached(run: BackgroundRun, at_least: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [int(step) for step in re.findall(r"step (\d+)/", run.output)]
        if found and max(found) >= at_least:
            return max(found)
        time.sleep(0.1)
    raise AssertionError(f"no step >= {at_least} within {timeout} s:\n{run.output[-3000:]}")


def freeze(pid: int) -> float:
    """SIGSTOP `pid`; the time once it is stopped (a write in flight when the signal arrives finishes first)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < deadline, f"pid {pid} did not stop"
        time.sleep(0.01)
    return time.time()


def assert_no_partial_checkpoints(directory: Path) -> None:
    names = [path.name for path in directory.iterdir()]
    assert not [name for name in names if "_temp" in name], names
    for name in names:
        if ".data-" in name:
            assert (directory / (name.split(".data-")[0] + ".index")).exists(), f"{name} has no index"


# ---------------------------------------------------------------------------------------------
# One writer
# ---------------------------------------------------------------------------------------------
def test_a_second_live_run_on_the_same_checkpoint_dir_refuses_and_names_the_holder(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with start(run_dir, *LONG_RUN) as first:
        steps_reached(first, 10)
        holder = json.loads((run_dir / "checkpoints" / "LEASE").read_text())
        started = time.monotonic()
        second = run_train(run_dir, *LONG_RUN, timeout=60)
        assert second.returncode == ExitCode.LEASE_CONFLICT, second.stderr[-3000:]
        assert time.monotonic() - started < 30
        message = second.stderr[second.stderr.index("error: "):]
        assert f"pid {holder['pid']}" in message and f"host {holder['host']}" in message
        assert "renewed the lease while this run waited" in message and "Traceback" not in second.stderr
        assert "step 5/" not in second.stdout + second.stderr, "the refused run trained"
        first.process.send_signal(signal.SIGTERM)
        assert first.finish(timeout=60) == 42
    assert not (run_dir / "checkpoints" / "LEASE").exists(), "a run that ends gives its lease back"
    saved = list_checkpoints(str(run_dir / "checkpoints"))
    assert saved and all(read_provenance(path)["pid"] == holder["pid"] for _, path in saved)


def test_a_frozen_holder_is_taken_over_and_stops_without_writing_when_it_wakes(tmp_path: Path) -> None:
    """A network partition or a VM slow to die: the old incarnation comes back after a new one took over."""
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    with start(run_dir, *LONG_RUN) as old:
        steps_reached(old, 20)
        freeze(old.process.pid)
        with start(run_dir, *LONG_RUN) as new:
            new.wait_for(r"taking over the expired lease", timeout=60)
            new_step = steps_reached(new, 30)
            # A save the freeze interrupted may still complete (no fencing on plain files); it is of
            # the step the old run printed last. No write may start after it wakes up.
            old_last_step = max(int(step) for step in re.findall(r"step (\d+)/", old.output))
            old.process.send_signal(signal.SIGCONT)
            assert old.finish(timeout=60) == ExitCode.LEASE_CONFLICT, old.output[-3000:]
            assert "lost its lease on checkpoint.dir" in old.output
            assert steps_reached(new, new_step + 20) > new_step, "the new holder keeps training"
            for step, path in list_checkpoints(str(checkpoints)):
                if read_provenance(path)["pid"] == old.process.pid:
                    assert step <= old_last_step, f"{path}: the old run wrote it after it woke up"
            new.process.send_signal(signal.SIGTERM)
            assert new.finish(timeout=60) == 42
    record = json.loads((run_dir / "run_record.json").read_text())
    assert [attempt["pid"] for attempt in record["history"]][-2:] == [old.process.pid, new.process.pid]
    assert [attempt["outcome"] for attempt in record["history"]][-2:] == ["killed", "preempted"]


# ---------------------------------------------------------------------------------------------
# Failing writes
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def tiny_filesystem(mount_point: Path, size: str = "2m") -> Iterator[Path]:
    mount_point.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, f"the fault tests need to mount a tmpfs (root, CAP_SYS_ADMIN): {mounted.stderr}"
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def fill(filesystem: Path) -> Path:
    filler = filesystem / "filler"
    with filler.open("wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC
    return filler


def remount(filesystem: Path, mode: str) -> None:
    """Linux refuses a read-only remount ("mount point is busy") while a file on it is open for writing or
    deleted but still open: a training run has one open for a moment during each save. Retry until between."""
    deadline = time.monotonic() + 30
    while True:
        result = subprocess.run(["mount", "-o", f"remount,{mode}", str(filesystem)], capture_output=True, text=True)
        if result.returncode == 0:
            return
        if "busy" not in result.stderr or time.monotonic() > deadline:
            raise AssertionError(f"remount,{mode} of {filesystem} failed: {result.stderr}")
        time.sleep(0.05)


def test_a_full_disk_then_a_read_only_filesystem_mid_run(tmp_path: Path) -> None:
    """Transient: the disk fills, saves fail and are retried, space comes back, training goes on.
    Lasting: the filesystem turns read-only, the run stops with exit 5, every earlier checkpoint
    intact and none half-written; once writable again, the same command resumes and finishes."""
    run_dir = tmp_path / "run"
    retrying = ("checkpoint.retry_backoff_seconds=0.3", "checkpoint.max_consecutive_failures=6")
    with tiny_filesystem(tmp_path / "fs") as filesystem:
        checkpoints = filesystem / "checkpoints"
        overrides = (*LONG_RUN, "trainer.max_steps=400", f"checkpoint.dir={checkpoints}", *retrying)
        with start(run_dir, *overrides) as run:
            steps_reached(run, 20)
            filler = fill(filesystem)
            run.wait_for(r"saving checkpoint ckpt-\d+ failed \(.*No space left on device", timeout=60)
            filler.unlink()
            failed_step = int(re.search(r"saving checkpoint ckpt-(\d+) failed", run.output).group(1))
            run.wait_for(rf"saved checkpoint ckpt-{failed_step} ", timeout=60)
            steps_reached(run, failed_step + 20)

            remount(filesystem, "ro")
            assert run.finish(timeout=120) == ExitCode.STORAGE_FAILED, run.output[-3000:]
        output = run.output
        assert "failed 6 times in a row (checkpoint.max_consecutive_failures)" in output
        assert "Read-only file system" in output and "every earlier checkpoint is intact" in output
        assert "Traceback" not in output
        remount(filesystem, "rw")
        # A write cut off by the remount may have left a data file (TensorFlow renames it into place
        # before writing the index) that a read-only filesystem kept from being deleted: it is never
        # listed as a checkpoint, and the next run removes it.
        newest = list_checkpoints(str(checkpoints))[0][0]
        assert newest >= failed_step + 10
        assert checkpoint_values(checkpoints / f"ckpt-{newest}")["step/.ATTRIBUTES/VARIABLE_VALUE"] == newest
        failures = event_scalars(run_dir / "tensorboard")["faults/checkpoint_write_failures"]
        assert failures and failures[0][0] == failed_step

        resumed = run_train(run_dir, *overrides)
        assert_ok(resumed)
        resumed_output = resumed.stdout + resumed.stderr
        assert f"resuming from checkpoint {checkpoints}/ckpt-{newest} at step {newest}" in resumed_output
        assert list_checkpoints(str(checkpoints))[0][0] == 400
        assert_no_partial_checkpoints(checkpoints)


@pytest.mark.parametrize(("kind", "lease"), [("not a directory", True), ("not a directory", False),
                                             ("read-only filesystem", True)])
def test_an_unwritable_checkpoint_dir_is_refused_before_training(tmp_path: Path, kind: str, lease: bool) -> None:
    run_dir = tmp_path / "run"
    lease_setting = f"lease.enabled={str(lease).lower()}"  # without the lease file, a probe file checks it
    if kind == "not a directory":
        (tmp_path / "a-file").write_text("x")
        checkpoint_dir = tmp_path / "a-file" / "checkpoints"
        result = run_train(run_dir, f"checkpoint.dir={checkpoint_dir}", lease_setting)
    else:
        with tiny_filesystem(tmp_path / "fs") as filesystem:
            remount(filesystem, "ro")
            checkpoint_dir = filesystem
            result = run_train(run_dir, f"checkpoint.dir={checkpoint_dir}", lease_setting)
    assert result.returncode == ExitCode.USER_ERROR, result.stderr[-3000:]
    message = result.stderr[result.stderr.index("error: "):]
    assert f"checkpoint.dir '{checkpoint_dir}' is not writable" in message and "Traceback" not in result.stderr
    assert "step 10/" not in result.stdout + result.stderr, "it trained before refusing"


@pytest.mark.parametrize("async_save", [False, True])
def test_the_checkpointer_retries_then_gives_up_and_leaves_no_partial_checkpoint(
        tmp_path: Path, async_save: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """In process, both save modes: an async save's write fails in the background and only shows
    at the next save or wait, where it must count (not reset the count) and be cleaned up. Its sleeps between
    retries add up to `longest_backoff_seconds`, which the hang watchdog allows for."""
    import keras

    from harness.checkpoint import checkpointer as checkpointer_module
    from harness.checkpoint.checkpointer import Checkpointer
    from harness.errors import StorageError
    from harness.training.state import create_train_state

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(64, name="dense")])
    state = create_train_state(model, keras.optimizers.Adam())
    with tiny_filesystem(tmp_path / "fs") as filesystem:
        checkpointer = Checkpointer(state, directory=str(filesystem), max_to_keep=5, keep_every_hours=None,
                                    async_save=async_save, is_chief=True, max_consecutive_failures=3,
                                    retry_backoff_seconds=0.05)
        checkpointer.save(10)
        checkpointer.wait()
        back_offs: list[float] = []
        remount(filesystem, "ro")  # (before the spy: a busy remount sleeps too)
        sleep = time.sleep
        monkeypatch.setattr(checkpointer_module.time, "sleep",
                            lambda seconds: back_offs.append(seconds) or sleep(seconds))
        with pytest.raises(StorageError, match=r"failed 3 times in a row"):
            for step in (20, 30, 40, 50):
                state.step.assign(step)
                checkpointer.save(step)
            checkpointer.wait()
        assert checkpointer.total_failures == 3
        assert sum(back_offs) == pytest.approx(checkpointer.longest_backoff_seconds) == 0.05 + 0.1  # the watchdog's
        remount(filesystem, "rw")
        assert [step for step, _ in list_checkpoints(str(filesystem))] == [10]
        assert checkpoint_values(filesystem / "ckpt-10")["step/.ATTRIBUTES/VARIABLE_VALUE"] == 0
