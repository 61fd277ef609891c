"""Unattended operation, with real train.py processes: config provenance, divergence rollback, the
hang watchdog, restart accounting and the crash-loop limit, and the exit-code table.

Faults are injected through data: an npz data set with one marked example at a chosen step, and a
test model (tests/fault_models.py) that turns NaN, crashes or stalls on it. So each fault happens at
the same step however the run was interrupted, as a bad record would.
"""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from harness.checkpoint.contents import read_provenance
from harness.checkpoint.files import list_checkpoints
from harness.errors import ExitCode
from harness.results.inspection import format_run_record
from scripts.tooling.chaos import compare_checkpoints
from tests.conftest import PROJECT_ROOT, assert_ok, checkpoint_values, event_scalars, run_train, subprocess_env
from tests.conftest import train_command as conftest_train_command
from tests.fault_models import MARKER

pytestmark = pytest.mark.slow

BATCH = 64
NUM_TRAIN = 4096  # 64 steps per epoch: a 60-step run meets each example once
MARKED_STEP = 33


def write_marked_data(directory: Path, *, marked_step: int | None = MARKED_STEP, marker: float = 2 * MARKER,
                      seed: int = 0) -> list[str]:
    """An npz train/eval pair whose one marked example is read at `marked_step` (run seed `seed`).

    The example is chosen with the harness's own input pipeline, among those of that step's batch
    that epoch 1 does not read in its first batches (where a rollback's skip could reach).
    """
    import tensorflow as tf

    from harness.data.in_memory_sources import ExampleArrays
    from harness.data.pipeline import SeekableInput

    rng = np.random.default_rng(0)
    features = rng.normal(size=(NUM_TRAIN, 16)).astype(np.float32)
    labels = (features[:, :4].argmax(axis=1)).astype(np.int64)
    if marked_step is not None:
        as_int32 = labels.astype(np.int32)
        examples = ExampleArrays(features, as_int32, features[:BATCH], as_int32[:BATCH], 4)
        pipeline = SeekableInput(examples, global_batch_size=BATCH, eval_batch_size=BATCH, shuffle_seed=seed,
                                 prefetch=0, num_replicas=1)
        batch = pipeline.train_indices(tf.range(marked_step * BATCH, (marked_step + 1) * BATCH, dtype=tf.int64))
        early_next_epoch = set(pipeline.train_indices(tf.range(NUM_TRAIN, NUM_TRAIN + 10 * BATCH,
                                                                dtype=tf.int64)).numpy().tolist())
        chosen = next(int(i) for i in batch.numpy() if int(i) not in early_next_epoch)
        features[chosen, :] = marker
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(directory / "train.npz", features=features, labels=labels)
    np.savez(directory / "eval.npz", features=rng.normal(size=(256, 16)).astype(np.float32),
             labels=rng.integers(0, 4, size=256))
    return ["data=npz", f"data.path={directory / 'train.npz'}", f"data.eval_path={directory / 'eval.npz'}"]


# Exact arithmetic, a 60-step run with checkpoints every 10 steps and a 5-batch rollback skip.
OPERATIONS = ("data.global_batch_size=64", "model.hidden=[32]", "trainer.max_steps=60", "trainer.steps_per_loop=10",
              "trainer.log_every=10", "trainer.eval_every=0", "checkpoint.every_steps=10", "export.enabled=false",
              "deterministic=true", "trainer.rollback_skip_batches=5")
NAN_MODEL = "model._target_=tests.fault_models.build_mlp_nan_on_marker"


def train(run_dir: Path, *overrides: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return run_train(run_dir, *OPERATIONS, *overrides, tiny=False, timeout=timeout)


def train_command(run_dir: Path, *overrides: str) -> list[str]:
    return conftest_train_command(run_dir, *OPERATIONS, *overrides, tiny=False)


def latest_step(run_dir: Path) -> int:
    return list_checkpoints(str(run_dir / "checkpoints"))[0][0]


def run_record(run_dir: Path) -> dict:
    return json.loads((run_dir / "run_record.json").read_text())


def directory_snapshot(directory: Path) -> dict[str, bytes]:
    """Every saved file's bytes; not Hydra's per-invocation job files (.hydra/, train.log)."""
    return {str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*"))
            if path.is_file() and ".hydra" not in path.parts and path.suffix != ".log"}


# ---------------------------------------------------------------------------------------------
# Config provenance
# ---------------------------------------------------------------------------------------------
def test_checkpoints_record_provenance_and_a_changed_config_is_refused_or_allowed(tmp_path: Path) -> None:
    data = write_marked_data(tmp_path / "data", marked_step=None)
    run_dir = tmp_path / "run"
    assert_ok(train(run_dir, *data, "trainer.max_steps=20"))
    provenance = read_provenance(str(run_dir / "checkpoints" / "ckpt-20"))
    assert provenance is not None
    assert provenance["config"]["model"]["hidden"] == [32] and provenance["config"]["trainer"]["max_steps"] == 20
    assert "trainer.max_steps=20" in provenance["overrides"]
    assert re.fullmatch(r"git:[0-9a-f]{40}(-dirty)?|unknown", provenance["harness_version"])
    assert provenance["tensorflow"].startswith("2.")

    before = directory_snapshot(run_dir)
    refused = train(run_dir, *data, "trainer.max_steps=40", "model.hidden=[16]", "optimizer.learning_rate=0.01",
                    "seed=3", "data.global_batch_size=32")
    assert refused.returncode == ExitCode.USER_ERROR, refused.stderr[-3000:]
    message = refused.stderr[refused.stderr.index("error: "):]
    for line in ("model.hidden: [32] -> [16]", "optimizer.learning_rate: 0.001 -> 0.01", "seed: 0 -> 3",
                 "data.global_batch_size: 64 -> 32", "resume.allow_config_change=["):
        assert line in message, message
    assert "trainer.max_steps: " not in message, "a free key is not refused"
    assert "Traceback" not in refused.stderr
    assert directory_snapshot(run_dir) == before, "a refused resume changed files"

    allowed = train(run_dir, *data, "trainer.max_steps=40", "trainer.log_every=5", "optimizer.learning_rate=0.01",
                    "resume.allow_config_change=[optimizer.learning_rate]")
    assert_ok(allowed)
    log = allowed.stdout + allowed.stderr
    assert "optimizer.learning_rate: 0.001 -> 0.01 (allowed by resume.allow_config_change)" in log
    assert "trainer.max_steps: 20 -> 40" in log and "resuming from checkpoint" in log
    learning_rates = dict(event_scalars(run_dir / "tensorboard")["train/learning_rate"])
    assert learning_rates[20] == pytest.approx(0.001) and learning_rates[40] == pytest.approx(0.01)
    assert read_provenance(str(run_dir / "checkpoints" / "ckpt-40"))["config"]["optimizer"]["learning_rate"] == 0.01


# ---------------------------------------------------------------------------------------------
# Divergence rollback
# ---------------------------------------------------------------------------------------------
def test_nan_is_rolled_back_past_its_batch_and_the_result_does_not_depend_on_restarts(tmp_path: Path) -> None:
    data = write_marked_data(tmp_path / "data")
    reference = tmp_path / "reference"
    result = train(reference, *data, NAN_MODEL)
    assert_ok(result)
    log = result.stdout + result.stderr
    assert f"rollback 1 of 3: the loss of step {MARKED_STEP} is nan (NaN); restored checkpoint" in log
    assert "ckpt-20 at step 20; replaying to step 29, then skipping 5 batches" in log
    final = checkpoint_values(reference / "checkpoints" / "ckpt-60")
    assert final["rollbacks/.ATTRIBUTES/VARIABLE_VALUE"] == 1
    assert final["skipped_batches/.ATTRIBUTES/VARIABLE_VALUE"] == 5
    assert all(np.isfinite(value).all() for name, value in final.items() if name.startswith("model/"))
    assert "saved checkpoint ckpt-29 " in log, "the skip is saved as soon as it applies"
    scalars = event_scalars(reference / "tensorboard")
    losses = scalars["train/loss"]
    assert [step for step, _ in losses] == list(range(10, 61, 10)), "each step once: the abandoned ones purged"
    assert all(math.isfinite(loss) for _, loss in losses)
    assert [(step, value) for step, value in scalars["faults/rollbacks"]] == [(MARKED_STEP, 1.0)]
    assert run_record(reference)["rollbacks"] == 1

    # The same run stopped at step 25 first: its rollback restores ckpt-25, not ckpt-20, and must
    # still end bit-for-bit where the uninterrupted run ends.
    interrupted = tmp_path / "interrupted"
    assert_ok(train(interrupted, *data, NAN_MODEL, "trainer.max_steps=25"))
    resumed = train(interrupted, *data, NAN_MODEL)
    assert_ok(resumed)
    assert "ckpt-25 at step 25; replaying to step 29" in resumed.stdout + resumed.stderr
    assert compare_checkpoints(reference / "checkpoints" / "ckpt-60", interrupted / "checkpoints" / "ckpt-60") == []

    # SIGKILLed right after the skip is saved (ckpt-29): the abandoned trajectory's ckpt-30, saved
    # before the divergence, must be gone, or the restart would resume from it, diverge again and
    # skip the batches a second time.
    killed = tmp_path / "killed"
    process = subprocess.Popen(train_command(killed, *data, NAN_MODEL), cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=subprocess_env())
    assert process.stdout is not None
    seen = []
    for line in process.stdout:
        seen.append(line)
        if "saved checkpoint ckpt-29 " in line:
            process.kill()
            break
    process.stdout.read()
    process.wait(timeout=60)
    assert any("(deleted the abandoned ckpt-30)" in line for line in seen), "".join(seen)[-3000:]
    skipped_on_disk = {step: checkpoint_values(path)["skipped_batches/.ATTRIBUTES/VARIABLE_VALUE"]
                       for step, path in list_checkpoints(str(killed / "checkpoints"))}
    assert skipped_on_disk[20] == 0 and skipped_on_disk[29] == 5
    assert all(skipped == 5 for step, skipped in skipped_on_disk.items() if step > 20), skipped_on_disk
    assert_ok(train(killed, *data, NAN_MODEL))
    assert compare_checkpoints(reference / "checkpoints" / "ckpt-60", killed / "checkpoints" / "ckpt-60") == []

    # Preempted while replaying towards the skip (one step per loop, so it stops before step 29):
    # the preemption checkpoint must carry the skip still ahead, or the restart would meet the NaN
    # again and roll back twice (rollbacks 2, not 1).
    preempted = tmp_path / "preempted"
    process = subprocess.Popen(train_command(preempted, *data, NAN_MODEL, "trainer.steps_per_loop=1"),
                               cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=subprocess_env())
    assert process.stdout is not None
    for line in process.stdout:
        if "rollback 1 of 3" in line:
            process.send_signal(signal.SIGTERM)
            break
    stopped_output = process.stdout.read()
    assert process.wait(timeout=60) == 42, stopped_output[-3000:]
    stopped_at = int(stopped_output.split("stopped at step ")[1].split()[0])
    assert 20 <= stopped_at < 29, stopped_output[-3000:]
    saved = checkpoint_values(preempted / "checkpoints" / f"ckpt-{stopped_at}")
    assert saved["skip_schedule/.ATTRIBUTES/VARIABLE_VALUE"][0].tolist() == [29, 5]
    assert saved["skipped_batches/.ATTRIBUTES/VARIABLE_VALUE"] == 0, "the skip lies ahead"
    resumed = train(preempted, *data, NAN_MODEL)
    assert_ok(resumed)
    assert "rollback 1 of 3" not in resumed.stdout + resumed.stderr, "the skip applied without a second rollback"
    assert compare_checkpoints(reference / "checkpoints" / "ckpt-60", preempted / "checkpoints" / "ckpt-60") == []


def test_divergence_beyond_max_rollbacks_stops_with_its_own_exit_code(tmp_path: Path) -> None:
    """The real MLP on a wildly scaled record: a finite loss far above trainer.loss_upper_bound."""
    data = write_marked_data(tmp_path / "data", marker=1e4)
    run_dir = tmp_path / "run"
    result = train(run_dir, *data, "trainer.loss_upper_bound=5", "trainer.max_rollbacks=0")
    assert result.returncode == ExitCode.DIVERGED, result.stderr[-3000:]
    assert result.returncode != 42, "a hopeless run must not look preempted"
    message = result.stderr[result.stderr.index("error: "):]
    assert f"Training diverged: the loss of step {MARKED_STEP} is" in message
    assert "above trainer.loss_upper_bound=5" in message and "trainer.max_rollbacks=0" in message
    assert "Traceback" not in result.stderr
    assert latest_step(run_dir) == 30, "nothing saved after the divergence, nothing before it lost"
    assert run_record(run_dir)["history"][-1]["outcome"] == "diverged"


# ---------------------------------------------------------------------------------------------
# Hang watchdog
# ---------------------------------------------------------------------------------------------
def test_watchdog_ends_a_stalled_step_with_a_stack_dump_and_its_exit_code(tmp_path: Path) -> None:
    data = write_marked_data(tmp_path / "data")
    run_dir = tmp_path / "run"
    started = time.monotonic()
    result = train(run_dir, *data, "model._target_=tests.fault_models.build_mlp_stall_on_marker",
                   "watchdog.min_seconds=3", "watchdog.factor=5", "watchdog.first_call_seconds=120",
                   "checkpoint.max_consecutive_failures=2", "checkpoint.retry_backoff_seconds=2",
                   timeout=120)  # one save retry: 2 s of back-off on top of every limit
    assert result.returncode == ExitCode.STALLED, result.stderr[-3000:]
    assert time.monotonic() - started < 100, "the watchdog, not the test timeout, ended it"
    assert "watchdog: train (10 steps) has run for" in result.stdout + result.stderr
    assert "plus 2 s for save retries' back-off" in result.stdout + result.stderr  # train.py passes the allowance
    assert "Thread 0x" in result.stderr and "in _stall" in result.stderr, "all threads' stacks are dumped"
    assert latest_step(run_dir) == 30
    record = run_record(run_dir)
    assert record["history"][-1]["outcome"] == "hung" and record["crashes"] == 1
    assert record["history"][-1]["detail"] == "no progress in the train phase"


# ---------------------------------------------------------------------------------------------
# Restart accounting and the crash-loop limit
# ---------------------------------------------------------------------------------------------
def test_restart_accounting_counts_kills_preemptions_and_redone_steps(tmp_path: Path) -> None:
    data = write_marked_data(tmp_path / "data", marked_step=None)
    run_dir = tmp_path / "run"
    command = train_command(run_dir, *data, "trainer.max_steps=100000", "checkpoint.every_steps=50",
                            "trainer.log_every=10")
    for sent in (signal.SIGKILL, signal.SIGTERM):
        process = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, env=subprocess_env())
        assert process.stdout is not None
        for line in process.stdout:
            if re.search(r"step (\d+)/100000", line) and int(re.search(r"step (\d+)/", line).group(1)) % 50 == 30:
                break  # 30 steps past a checkpoint: a SIGKILL loses them
        process.send_signal(sent)
        process.stdout.read()
        process.wait(timeout=60)
    record = run_record(run_dir)
    # The kill is counted when the next attempt starts.
    assert record["attempts"] == 2 and record["kills"] == 1 and record["preemptions"] == 1, record
    assert record["steps_redone"] >= 30 and record["wall_time_lost_seconds"] > 0
    assert [attempt["outcome"] for attempt in record["history"]] == ["killed", "preempted"]

    finished = train(run_dir, *data, "trainer.max_steps=" + str(latest_step(run_dir) + 10))
    assert_ok(finished)
    record = run_record(run_dir)
    assert record["restarts"] == 2 and record["kills"] == 1 and record["attempts"] == 3
    assert "run record: attempt 3: 2 restarts (1 preemptions, 1 kills, 0 crashes)" in finished.stdout + finished.stderr
    scalars = event_scalars(run_dir / "tensorboard")
    assert scalars["run/kills"][-1][1] == 1 and scalars["run/preemptions"][-1][1] == 1
    kill_steps = [step for step, _ in scalars["run/kills"]]
    assert len(kill_steps) == len(set(kill_steps)) == 2, "two attempts resumed from step 0: one point there"
    shown = "\n".join(format_run_record(str(run_dir)))  # what scripts/inspect_checkpoint.py prints (test_inspect.py)
    assert "1 kills" in shown and "preempted" in shown and "killed" in shown


def test_repeated_crashes_at_the_same_step_end_the_retry_loop(tmp_path: Path) -> None:
    data = write_marked_data(tmp_path / "data")
    run_dir = tmp_path / "run"
    crashing = (*data, "model._target_=tests.fault_models.build_mlp_crash_on_marker", "trainer.max_crash_restarts=2")
    for attempt in (1, 2):
        crashed = train(run_dir, *crashing)
        assert crashed.returncode == ExitCode.INTERNAL_ERROR, crashed.stderr[-3000:]
        assert "a marked example reached the model" in crashed.stderr
        assert run_record(run_dir)["consecutive_crashes"] == attempt
    checkpoints = directory_snapshot(run_dir / "checkpoints")

    refused = train(run_dir, *crashing)
    assert refused.returncode == ExitCode.CRASH_LOOP, refused.stderr[-3000:]
    message = refused.stderr[refused.stderr.index("error: "):]
    assert "The last 2 attempts of this run all crashed at step 30" in message and "Traceback" not in refused.stderr
    assert directory_snapshot(run_dir / "checkpoints") == checkpoints
    assert run_record(run_dir)["attempts"] == 2, "a refused start is not an attempt"
    # A changed config or harness version resets the count: tests/test_run_record.py.


def test_a_stop_signal_between_sweep_jobs_stops_the_next_job_at_its_first_boundary() -> None:
    """In a multirun, the next job loads its data and restores before its own handlers are in place: a SIGTERM
    then must not be lost (it was printed as 'exiting normally' and the job trained on)."""
    from harness.operations.preemption import PreemptionWatcher, carry_stop_signals_to_the_next_job

    previous = signal.getsignal(signal.SIGTERM)
    try:
        carry_stop_signals_to_the_next_job(["SIGTERM"])
        signal.raise_signal(signal.SIGTERM)  # while the next job starts
        with PreemptionWatcher(["SIGTERM"], exit_code=42) as watcher:
            assert watcher.requested and watcher.received == signal.SIGTERM
        with PreemptionWatcher(["SIGTERM"], exit_code=42) as watcher:  # the job after that starts afresh
            assert not watcher.requested
    finally:
        signal.signal(signal.SIGTERM, previous)
