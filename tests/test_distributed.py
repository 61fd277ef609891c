"""Distributed training for real: MirroredStrategy on logical CPUs, a 2-process MultiWorkerMirroredStrategy.

The multi-worker tests run `scripts/launch_local.py` the way a user would and send real signals to
real processes: normal completion, a SIGKILLed worker followed by a gang restart, a frozen worker,
SIGTERM to one worker, and a SIGTERMed gang that saves once, refuses workers that cannot see its
checkpoints, and resumes.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from harness.checkpoint.files import CHECKPOINT_NAME, list_checkpoints
from harness.distributed import cluster
from harness.errors import ExitCode
from tests.background import BackgroundRun
from tests.conftest import PROJECT_ROOT, TINY, assert_ok, checkpoint_values, run_train, subprocess_env, train_command

LAUNCH_LOCAL = PROJECT_ROOT / "scripts" / "launch_local.py"
TOLERANCE = 1e-3  # max |difference| of any variable after 300 steps

# 300 steps of the tiny config, checkpointed at the end only: the equivalence runs.
EQUIVALENCE = ("trainer.max_steps=300", "trainer.steps_per_loop=50", "trainer.log_every=100", "trainer.eval_every=0",
               "checkpoint.every_steps=300", "export.enabled=false")
# Long enough to be interrupted after ckpt-50: checkpoints every 25 steps, signals seen every 5 steps.
INTERRUPTIBLE_STEPS = 150
INTERRUPTIBLE = (f"trainer.max_steps={INTERRUPTIBLE_STEPS}", "trainer.steps_per_loop=5", "trainer.log_every=25",
                 "trainer.eval_every=0", "checkpoint.every_steps=25", "strategy.peer_timeout_seconds=10",
                 "export.enabled=false")
SURVIVOR_DEADLINE = 60  # seconds a survivor may take to exit on its own after its peer died


# -- helpers -------------------------------------------------------------------------------------------
def local_gang(run_dir: Path, *overrides: str, tmpdir: Path, grace_seconds: float = 120) -> BackgroundRun:
    """`scripts/launch_local.py` with 2 workers, whose temporary files go to `tmpdir`."""
    tmpdir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(LAUNCH_LOCAL), "--workers", "2", "--grace-seconds", str(grace_seconds), "--",
               f"run_dir={run_dir}", *TINY, *overrides]
    return BackgroundRun(command, env=subprocess_env(TMPDIR=str(tmpdir)))


def worker_pid(gang: BackgroundRun, index: int) -> int:
    return int(gang.wait_for(rf"^\[gang\] started worker{index} \(pid (\d+)\)", timeout=30).group(1))


def run_gang(run_dir: Path, *overrides: str, tmpdir: Path, timeout: float = 180) -> tuple[int, str]:
    with local_gang(run_dir, *overrides, tmpdir=tmpdir) as gang:
        return gang.finish(timeout=timeout), gang.output


def worker_lines(output: str, index: int) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(f"[worker{index}] ")]


def max_difference(first: Path, second: Path) -> float:
    """Of the training state; not TensorFlow's save_counter (runs may save different numbers of times)."""
    a, b = ({name: value for name, value in checkpoint_values(path).items() if not name.startswith("save_counter/")}
            for path in (first, second))
    assert a.keys() == b.keys(), f"different variables: {sorted(a.keys() ^ b.keys())}"
    return max(float(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)))) for k in a)


def assert_one_copy_of_checkpoints(run_dir: Path, tmpdir: Path, *, steps: set[int]) -> None:
    """The chief's checkpoint dir holds exactly `steps`; no worker left checkpoint files anywhere."""
    checkpoint_dir = run_dir / "checkpoints"
    assert {step for step, _ in list_checkpoints(str(checkpoint_dir))} == steps
    expected = {"checkpoint"} | {f"ckpt-{s}.index" for s in steps} | {f"ckpt-{s}.data-00000-of-00001" for s in steps}
    assert {p.name for p in checkpoint_dir.iterdir()} == expected
    elsewhere = [p for p in run_dir.rglob(f"{CHECKPOINT_NAME}-*") if p.parent != checkpoint_dir]
    assert not elsewhere, f"checkpoint files outside checkpoint.dir: {elsewhere}"
    assert not list(tmpdir.glob("harness-worker-ckpt-*")), "a worker left its temporary checkpoint directory"


def resumed_step(lines: list[str]) -> int:
    for line in lines:
        if match := re.search(r"resuming from checkpoint \S+ at step (\d+)", line):
            return int(match.group(1))
    raise AssertionError("no 'resuming from checkpoint' line:\n" + "\n".join(lines[-40:]))


def stop_steps(output: str) -> dict[int, list[int]]:
    """Per worker, the steps of its 'stopped at step N after a stop signal' lines."""
    return {index: [int(m.group(1)) for line in worker_lines(output, index)
                    if (m := re.search(r"stopped at step (\d+) after a stop signal", line))] for index in (0, 1)}


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: 300 steps on one device (run dir)."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    assert_ok(run_train(run_dir, *EQUIVALENCE))
    return run_dir


# -- input sharding (in-process, no strategy needed) ----------------------------------------------------
def _identifiable_input(*, num_train: int, num_eval: int, global_batch_size: int, num_replicas: int):
    import tensorflow as tf

    from harness.data.in_memory_sources import ExampleArrays
    from harness.data.pipeline import SeekableInput

    def features(count: int, offset: int) -> np.ndarray:  # feature 0 is the example's id
        return np.repeat(np.arange(offset, offset + count, dtype=np.float32)[:, None], 3, axis=1)

    examples = ExampleArrays(features(num_train, 0), np.zeros(num_train, np.int32),
                             features(num_eval, 10_000), np.zeros(num_eval, np.int32), num_classes=2)
    pipeline = SeekableInput(examples, global_batch_size=global_batch_size, eval_batch_size=global_batch_size,
                             shuffle_seed=7, prefetch=0, num_replicas=num_replicas)
    return tf, pipeline


@pytest.mark.parametrize(("num_workers", "replicas_per_worker"), [(2, 1), (2, 2), (3, 2)])
def test_train_input_gives_each_example_once_per_epoch_across_workers(num_workers: int,
                                                                       replicas_per_worker: int) -> None:
    num_replicas = num_workers * replicas_per_worker
    tf, pipeline = _identifiable_input(num_train=240, num_eval=10, global_batch_size=4 * num_replicas,
                                       num_replicas=num_replicas)
    steps_per_epoch = 240 // pipeline.global_batch_size
    # per (step, global replica id): the example ids that replica trains on
    seen: dict[tuple[int, int], list[int]] = {}
    for worker in range(num_workers):
        context = tf.distribute.InputContext(num_input_pipelines=num_workers, input_pipeline_id=worker,
                                             num_replicas_in_sync=num_replicas)
        batches = pipeline.train_dataset(context, start_step=0).take(2 * steps_per_epoch * replicas_per_worker)
        for element, batch in enumerate(batches):
            step, local = divmod(element, replicas_per_worker)
            seen[(step, worker * replicas_per_worker + local)] = batch.features.numpy()[:, 0].astype(int).tolist()
    for epoch in range(2):
        ids = [i for (step, _), batch in seen.items() if step // steps_per_epoch == epoch for i in batch]
        assert sorted(ids) == list(range(240)), f"epoch {epoch}: not every example exactly once"
    first_epoch = [seen[(s, r)] for s in range(steps_per_epoch) for r in range(num_replicas)]
    second_epoch = [seen[(s, r)] for s in range(steps_per_epoch, 2 * steps_per_epoch) for r in range(num_replicas)]
    assert first_epoch != second_epoch, "the second epoch repeats the first one's order"
    for step in (0, steps_per_epoch + 1):  # replicas in id order make up the single-device global batch
        cluster_batch = [i for r in range(num_replicas) for i in seen[(step, r)]]
        assert cluster_batch == pipeline.train_batch(step)[0][:, 0].astype(int).tolist()


def test_eval_input_covers_the_eval_split_once_across_workers() -> None:
    tf, pipeline = _identifiable_input(num_train=64, num_eval=50, global_batch_size=8, num_replicas=4)
    weighted: list[int] = []
    batches_per_worker = []
    for worker in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker, num_replicas_in_sync=4)
        batches = list(pipeline.eval_dataset(context))
        batches_per_worker.append(len(batches))
        for batch in batches:
            ids = batch.features.numpy()[:, 0].astype(int)
            weighted.extend(ids[batch.weights.numpy() > 0].tolist())
    assert sorted(weighted) == list(range(10_000, 10_050))
    assert batches_per_worker[0] == batches_per_worker[1], "workers would run different numbers of eval steps"


# -- only the chief writes checkpoint.dir ---------------------------------------------------------------------
def test_a_non_chief_saves_to_a_private_directory_that_exists_only_during_the_save(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import keras

    from harness.checkpoint.checkpointer import Checkpointer
    from harness.training.state import create_train_state

    tmpdir, checkpoint_dir = tmp_path / "tmp", tmp_path / "checkpoints"
    tmpdir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))  # where this process's temporary files go
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="dense")])
    state = create_train_state(model, keras.optimizers.Adam())
    checkpointer = Checkpointer(state, directory=str(checkpoint_dir), max_to_keep=2, keep_every_hours=None,
                                async_save=False, is_chief=False)
    assert checkpointer.restore_latest().step is None
    assert not list(tmpdir.iterdir()), "created before any save: a worker that never saves would leave it"
    for step in (10, 20, 30):
        state.step.assign(step)
        checkpointer.save(step)
        assert not list(tmpdir.iterdir()), f"ckpt-{step} left in the worker's temporary directory"
    assert not checkpoint_dir.exists(), "a non-chief wrote to checkpoint.dir"


# -- MirroredStrategy on logical CPU devices ----------------------------------------------------------------
def test_global_batch_not_divisible_by_replicas_is_refused(run_dir: Path) -> None:
    result = run_train(run_dir, "strategy=mirrored", "strategy.cpu_replicas=2", "data.global_batch_size=63")
    assert_ok(result, code=2)
    assert "data.global_batch_size' = 63 is not divisible by the 2 replicas" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.slow
def test_mirrored_on_two_cpu_devices_trains_the_same_model(run_dir: Path, single_device_run: Path) -> None:
    result = run_train(run_dir, *EQUIVALENCE, "strategy=mirrored", "strategy.cpu_replicas=2")
    assert_ok(result)
    assert "strategy: mirrored with 2 replica(s) in sync" in result.stdout + result.stderr
    assert int(checkpoint_values(run_dir / "checkpoints" / "ckpt-300")["step/.ATTRIBUTES/VARIABLE_VALUE"]) == 300
    difference = max_difference(single_device_run / "checkpoints" / "ckpt-300", run_dir / "checkpoints" / "ckpt-300")
    assert difference < TOLERANCE
    # Checkpoints hold plain values, not per-replica copies: the run resumes on one device.
    resumed = run_train(run_dir, *EQUIVALENCE, "trainer.max_steps=350")
    assert_ok(resumed)
    assert "strategy: default with 1 replica(s) in sync" in resumed.stdout + resumed.stderr
    assert "at step 300" in resumed.stdout + resumed.stderr
    assert int(checkpoint_values(run_dir / "checkpoints" / "ckpt-350")["step/.ATTRIBUTES/VARIABLE_VALUE"]) == 350


# -- MultiWorkerMirroredStrategy: 2 processes on loopback --------------------------------------------------
@pytest.mark.slow
def test_multi_worker_completes_with_one_copy_of_checkpoints(tmp_path: Path, single_device_run: Path) -> None:
    """Also paced by the chief: with checkpoint.max_overhead, the chief's first save stretches the interval for
    every worker (a non-chief's saves take no time and would keep every_steps)."""
    run_dir, tmpdir = tmp_path / "run", tmp_path / "tmp"
    code, output = run_gang(run_dir, *EQUIVALENCE, "export.enabled=true", "checkpoint.every_steps=50",
                            "checkpoint.max_overhead=0.0001", tmpdir=tmpdir)
    assert code == 0, output[-6000:]
    for index in (0, 1):
        assert any("strategy: multi_worker with 2 replica(s) in sync, this process is worker"
                   f"{index}" in line for line in worker_lines(output, index)), output[-6000:]
        saved = [int(m.group(1)) for line in worker_lines(output, index)
                 if (m := re.search(r"saved checkpoint ckpt-(\d+)", line))]
        assert saved == [50, 300], output[-6000:]
    assert_one_copy_of_checkpoints(run_dir, tmpdir, steps={50, 300})
    # Keras all-reduced the gradients: the same model as one device with the same global batch.
    assert max_difference(single_device_run / "checkpoints" / "ckpt-300", run_dir / "checkpoints" / "ckpt-300") \
        < TOLERANCE
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1, "only the chief writes events"
    exports = [line for line in output.splitlines() if "harness.results.export" in line and "exported" in line]
    assert len(exports) == 1 and exports[0].startswith("[worker0] "), "only the chief exports"


@pytest.mark.slow
def test_a_gang_resumed_with_released_variables_ends_where_an_uninterrupted_gang_ends(tmp_path: Path) -> None:
    """Kernels of 784 x 1024 and 1024 x 1024 (3-4 MB, above restoring.RELEASE_MIN_BYTES): each worker's restore
    releases its copies before reading, and the resumed gang still ends bit-identical. (That they are released,
    and what it saves, is measured in-process: tests/test_checkpoint_io.py.)"""
    overrides = ("model.hidden=[1024,1024]", "deterministic=true", "trainer.eval_every=0", "checkpoint.every_steps=20",
                 "data.prefetch=2")  # the tf.data input path, as multi-worker jobs on GPUs take it
    interrupted, uninterrupted, tmpdir = tmp_path / "interrupted", tmp_path / "uninterrupted", tmp_path / "tmp"
    outputs = []
    for run_dir, steps in ((interrupted, 40), (interrupted, 60), (uninterrupted, 60)):
        code, output = run_gang(run_dir, *overrides, f"trainer.max_steps={steps}", tmpdir=tmpdir)
        assert code == 0, output[-6000:]
        outputs.append(output)
    assert resumed_step(worker_lines(outputs[1], 0)) == resumed_step(worker_lines(outputs[1], 1)) == 40
    assert max_difference(interrupted / "checkpoints" / "ckpt-60", uninterrupted / "checkpoints" / "ckpt-60") == 0


@pytest.mark.slow
def test_sigkilled_worker_fails_the_gang_and_a_gang_restart_finishes(tmp_path: Path) -> None:
    run_dir, tmpdir = tmp_path / "run", tmp_path / "tmp"
    # grace 120 s > the deadline: the survivor must exit on its own, not be killed by the launcher.
    with local_gang(run_dir, *INTERRUPTIBLE, tmpdir=tmpdir, grace_seconds=120) as gang:
        chief = worker_pid(gang, 0)
        gang.wait_for(r"^\[worker0\] .*saved checkpoint ckpt-50\b", timeout=120)
        os.kill(chief, signal.SIGKILL)
        killed_at = time.monotonic()
        survivor = gang.wait_for(r"^\[gang\] worker1 exited with code (\d+)", timeout=SURVIVOR_DEADLINE)
        assert time.monotonic() - killed_at < SURVIVOR_DEADLINE
        assert int(survivor.group(1)) != 0
        assert gang.finish(timeout=30) != 0
    latest = list_checkpoints(str(run_dir / "checkpoints"))[0][0]
    assert 50 <= latest < INTERRUPTIBLE_STEPS, "the kill did not land mid-run"

    code, output = run_gang(run_dir, *INTERRUPTIBLE, tmpdir=tmpdir)
    assert code == 0, output[-6000:]
    assert resumed_step(worker_lines(output, 0)) == resumed_step(worker_lines(output, 1)) == latest
    final = run_dir / "checkpoints" / f"ckpt-{INTERRUPTIBLE_STEPS}"
    assert list_checkpoints(str(run_dir / "checkpoints"))[0][0] == INTERRUPTIBLE_STEPS
    assert int(checkpoint_values(final)["step/.ATTRIBUTES/VARIABLE_VALUE"]) == INTERRUPTIBLE_STEPS


@pytest.mark.slow
@pytest.mark.parametrize(("detector", "overrides", "evidence"), [
    # Missing heartbeats fail the survivor's collectives; the harness says so in one paragraph.
    ("heartbeats", ("strategy.peer_timeout_seconds=5",), "error: Lost contact with another worker at step"),
    # Heartbeats slower than the hang watchdog: the watchdog ends the survivor, with a stack dump.
    ("watchdog", ("strategy.peer_timeout_seconds=300", "watchdog.min_seconds=3", "watchdog.first_call_seconds=60",
                  "checkpoint.max_consecutive_failures=1"),  # no save retries for the watchdog to wait for
     "watchdog: train"),
])
def test_frozen_worker_is_detected_and_the_launcher_kills_it(tmp_path: Path, detector: str, overrides: tuple[str, ...],
                                                             evidence: str) -> None:
    """SIGSTOP: no connection reset, only missing heartbeats (like a machine that vanished)."""
    run_dir, tmpdir = tmp_path / "run", tmp_path / "tmp"
    with local_gang(run_dir, *INTERRUPTIBLE, *overrides, tmpdir=tmpdir, grace_seconds=2) as gang:
        frozen = worker_pid(gang, 1)
        gang.wait_for(r"^\[worker0\] .*saved checkpoint ckpt-50\b", timeout=120)
        os.kill(frozen, signal.SIGSTOP)
        frozen_at = time.monotonic()
        survivor = gang.wait_for(r"^\[gang\] worker0 exited with code (\d+)", timeout=SURVIVOR_DEADLINE)
        assert time.monotonic() - frozen_at < SURVIVOR_DEADLINE
        assert int(survivor.group(1)) == ExitCode.STALLED, gang.output[-5000:]
        assert gang.finish(timeout=30) == ExitCode.STALLED, "the gang reports the first failure"
        assert re.search(r"^\[gang\] killing worker1 ", gang.output, re.MULTILINE), "the frozen worker was not killed"
        survivor_output = "\n".join(worker_lines(gang.output, 0))
        assert evidence in survivor_output, survivor_output[-5000:]
        if detector == "heartbeats":
            assert "stopped sending heartbeats" in survivor_output and "Traceback" not in survivor_output
        else:
            assert "Thread 0x" in survivor_output, "the watchdog dumps every thread's stack"


@pytest.mark.slow
def test_a_worker_lost_during_start_up_stops_the_survivor_with_exit_4(tmp_path: Path) -> None:
    """Start-up has collectives too (variables' initial values, the restored-step check): a peer frozen there is
    a lost peer (exit 4, the gang restarts), not a traceback and exit 1 (a crash, not restarted)."""
    run_dir, tmpdir = tmp_path / "run", tmp_path / "tmp"
    with local_gang(run_dir, *INTERRUPTIBLE, "strategy.peer_timeout_seconds=5", tmpdir=tmpdir, grace_seconds=2) as gang:
        frozen = worker_pid(gang, 1)
        gang.wait_for(r"^\[worker1\] .*strategy: multi_worker with 2 replica", timeout=120)
        os.kill(frozen, signal.SIGSTOP)  # before it builds the model
        survivor = gang.wait_for(r"^\[gang\] worker0 exited with code (\d+)", timeout=SURVIVOR_DEADLINE)
        survivor_output = "\n".join(worker_lines(gang.output, 0))
        assert int(survivor.group(1)) == ExitCode.STALLED, survivor_output[-5000:]
        assert gang.finish(timeout=30) == ExitCode.STALLED
        assert "error: Lost contact with another worker during start-up" in survivor_output
        assert "Traceback" not in survivor_output
    assert not (run_dir / "checkpoints").exists() or not list_checkpoints(str(run_dir / "checkpoints"))


@pytest.mark.slow
def test_sigterm_to_one_worker_stops_every_worker_at_the_same_step(tmp_path: Path) -> None:
    """One evicted pod or one signalled task: the workers all-reduce their stop flags."""
    run_dir, tmpdir = tmp_path / "run", tmp_path / "tmp"
    with local_gang(run_dir, *INTERRUPTIBLE, tmpdir=tmpdir) as gang:
        worker = worker_pid(gang, 1)
        gang.wait_for(r"^\[worker0\] .*saved checkpoint ckpt-50\b", timeout=120)
        os.kill(worker, signal.SIGTERM)
        assert gang.finish(timeout=SURVIVOR_DEADLINE) == 42, gang.tail()
        output = gang.output
    stops = stop_steps(output)
    assert len(stops[0]) == 1 and stops[0] == stops[1], f"workers stopped at {stops}"
    assert not any("received SIGTERM" in line for line in worker_lines(output, 0))
    assert list_checkpoints(str(run_dir / "checkpoints"))[0][0] == stops[0][0] < INTERRUPTIBLE_STEPS


@pytest.mark.slow
def test_sigterm_to_the_gang_saves_once_at_the_same_step_and_a_rerun_finishes(tmp_path: Path) -> None:
    run_dir, tmpdir = tmp_path / "run", tmp_path / "tmp"
    overrides = (*INTERRUPTIBLE, "data.prefetch=2")  # the tf.data input path (the default 0 is tested above)
    with local_gang(run_dir, *overrides, tmpdir=tmpdir) as gang:
        gang.wait_for(r"^\[worker0\] .*saved checkpoint ckpt-50\b", timeout=120)
        os.kill(gang.process.pid, signal.SIGTERM)
        assert gang.finish(timeout=SURVIVOR_DEADLINE) == 42, gang.tail()
        output = gang.output
    stops = stop_steps(output)
    assert len(stops[0]) == 1 and stops[0] == stops[1], f"workers stopped at {stops}"
    stop_step = stops[0][0]
    assert 50 <= stop_step < INTERRUPTIBLE_STEPS
    for index in (0, 1):
        assert any("received SIGTERM" in line for line in worker_lines(output, index))
        saves = [line for line in worker_lines(output, index) if f"saved checkpoint ckpt-{stop_step} " in line]
        assert len(saves) == 1, f"worker{index} saved ckpt-{stop_step} {len(saves)} times"
    assert list_checkpoints(str(run_dir / "checkpoints"))[0][0] == stop_step

    # A worker that cannot see the checkpoints (checkpoint.dir on its own disk) is refused by all.
    with contextlib.ExitStack() as running:
        workers = [running.enter_context(BackgroundRun(
            train_command(run_dir, *overrides, "strategy=multi_worker", f"checkpoint.dir={checkpoint_dir}"),
            env=subprocess_env(TF_CONFIG=cluster.to_json(tf_config), TMPDIR=str(tmpdir))))
            for checkpoint_dir, tf_config in zip([run_dir / "checkpoints", tmp_path / "elsewhere"],
                                                 cluster.local_cluster(2))]
        for index, worker in enumerate(workers):
            assert worker.finish(timeout=120) == 2, worker.tail()
            assert f"did not restore the same checkpoint: they found no checkpoint, step {stop_step}; " \
                   f"worker{index} found" in worker.output
    assert list_checkpoints(str(run_dir / "checkpoints"))[0][0] == stop_step

    code, output = run_gang(run_dir, *overrides, tmpdir=tmpdir)
    assert code == 0, output[-6000:]
    assert resumed_step(worker_lines(output, 0)) == resumed_step(worker_lines(output, 1)) == stop_step
    kept = {step for step, _ in list_checkpoints(str(run_dir / "checkpoints"))}
    assert max(kept) == INTERRUPTIBLE_STEPS
    assert_one_copy_of_checkpoints(run_dir, tmpdir, steps=kept)
