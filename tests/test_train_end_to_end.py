"""train.py as a user runs it: real subprocesses, real checkpoints and TensorBoard files on disk."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from scripts.tooling.benchmarking import LOG_MARKS
from tests.conftest import (
    PROJECT_ROOT,
    TRAIN_PY,
    assert_ok,
    checkpoint_values,
    event_scalars,
    run_train,
    subprocess_env,
)


@pytest.mark.slow
def test_default_run_trains_checkpoints_logs_and_resumes(run_dir: Path) -> None:
    result = run_train(run_dir, "optimizer.learning_rate=0.01")
    assert_ok(result)

    # Checkpoints: every 20 steps, 3 kept, the final one at max_steps; the step counter inside.
    checkpoint_dir = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoint_dir.glob("*.index")) == ["ckpt-20.index", "ckpt-40.index",
                                                                       "ckpt-60.index"]
    final = checkpoint_values(checkpoint_dir / "ckpt-60")
    assert final["step/.ATTRIBUTES/VARIABLE_VALUE"] == 60
    assert final["optimizer/iteration/.ATTRIBUTES/VARIABLE_VALUE"] == 60
    assert final["model/dense_0/kernel/.ATTRIBUTES/VARIABLE_VALUE"].shape == (64, 32)
    assert (run_dir / "config.yaml").read_text().count("max_steps: 60") == 1

    # Non-TTY progress: plain periodic log lines with rate and ETA.
    assert "step 10/60" in result.stdout and "steps/s, eta" in result.stdout
    # scripts/benchmark.py times start-ups to these log lines.
    assert all(mark.search(result.stdout + result.stderr) for mark in LOG_MARKS.values())

    # TensorBoard: everything the README promises, read back with TensorBoard's loader.
    scalars = event_scalars(run_dir / "tensorboard")
    for tag in ("train/loss", "train/accuracy", "train/learning_rate", "eval/loss", "eval/accuracy",
                "perf/steps_per_second", "perf/examples_per_second", "perf/checkpoint_save_seconds"):
        assert tag in scalars, f"missing {tag}: {sorted(scalars)}"
    assert [step for step, _ in scalars["train/loss"]] == [10, 20, 30, 40, 50, 60]
    assert [step for step, _ in scalars["eval/accuracy"]] == [30, 60]
    losses = [value for _, value in scalars["train/loss"]]
    assert losses[-1] < 0.8 * losses[0], f"loss did not fall: {losses}"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    hparams_plugin = accumulator.PluginTagToContent("hparams")
    assert hparams_plugin, "no hparams summary"

    # The same command again: already complete, exits 0 quickly, changes nothing.
    before = {p.name: p.stat().st_mtime_ns for p in checkpoint_dir.iterdir()}
    started = time.monotonic()
    again = run_train(run_dir, "optimizer.learning_rate=0.01")
    assert_ok(again)
    assert "training already complete" in again.stdout
    assert time.monotonic() - started < 60
    assert {p.name: p.stat().st_mtime_ns for p in checkpoint_dir.iterdir()} == before

    # A higher max_steps resumes from step 60 (not from scratch) and continues to 80.
    extended = run_train(run_dir, "optimizer.learning_rate=0.01", "trainer.max_steps=80")
    assert_ok(extended)
    assert "at step 60" in extended.stdout
    assert "step 10/80" not in extended.stdout
    assert checkpoint_values(checkpoint_dir / "ckpt-80")["step/.ATTRIBUTES/VARIABLE_VALUE"] == 80


def test_help_and_cfg_job_work_without_training(tmp_path: Path) -> None:
    env = subprocess_env()
    helped = subprocess.run([sys.executable, str(TRAIN_PY), "--help"], capture_output=True, text=True, env=env,
                            cwd=PROJECT_ROOT, timeout=60)
    assert_ok(helped)
    assert "model: cnn, mlp" in helped.stdout and "optimizer: adam, adamw, sgd" in helped.stdout
    shown = subprocess.run([sys.executable, str(TRAIN_PY), "--cfg", "job", "model=cnn", "trainer.max_steps=7"],
                           capture_output=True, text=True, env=env, cwd=PROJECT_ROOT, timeout=60)
    assert_ok(shown)
    assert "max_steps: 7" in shown.stdout and "models.cnn.build_cnn" in shown.stdout
    assert not (PROJECT_ROOT / "outputs" / "default" / "checkpoints" / "ckpt-7.index").exists()


@pytest.mark.parametrize(
    ("override", "named_key"),
    [
        ("trainer.max_stepz=5", "max_stepz"),  # misspelt key
        ("+trainer.new_key=1", "new_key"),  # a key the schema lacks
        ("trainer.max_steps=abc", "trainer.max_steps"),  # wrong type
        ("trainer.max_steps=0", "trainer.max_steps"),  # out of range (our own validation)
        ("optimizer.schedule.name=linear", "optimizer.schedule.name"),
        ("model.widths=[3]", "widths"),
        ("preemption.signals=[SIGKILL]", "preemption.signals"),
        ("trainer.max_rollbacks=65", "trainer.max_rollbacks"),
    ],
)
def test_bad_config_is_refused_with_a_message_naming_the_key(run_dir: Path, override: str, named_key: str) -> None:
    result = run_train(run_dir, override, timeout=120)
    assert result.returncode == 2, "a config error, whether Hydra or the harness finds it"
    output = result.stdout + result.stderr
    assert named_key in output
    assert "Traceback (most recent call last)" not in output
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.parametrize("overrides", [("+trainer.new_key=1",), ("trainer.max_steps=0",),
                                       ("data=tokens", "data.path=train.bin", "data.dtype=int16")])
def test_a_config_error_is_reported_before_tensorflow_is_imported(run_dir: Path, overrides: tuple[str, ...]) -> None:
    """A typo costs half a second, not a TensorFlow import (Hydra's and the harness's own checks)."""
    command = [sys.executable, "-X", "importtime", str(TRAIN_PY), f"run_dir={run_dir}", *overrides]
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, env=subprocess_env(),
                            timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")]
    assert "harness.config.schema" in imported  # the check below would be vacuous without -X importtime output
    assert "tensorflow" not in imported


@pytest.mark.slow
def test_multirun_gives_each_job_its_own_run_directory(tmp_path: Path) -> None:
    """Run from another directory, as users do: outputs/ lands in the working directory."""
    command = [sys.executable, str(TRAIN_PY), "-m", "optimizer.learning_rate=1e-3,1e-2", "experiment=sweep",
               "trainer.max_steps=20", "checkpoint.every_steps=10", "data.num_examples=1024", "data.eval_examples=128"]
    result = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=300)
    assert_ok(result)
    sweep = tmp_path / "outputs" / "sweep"
    jobs = sorted(p.name for p in sweep.iterdir() if (p / "checkpoints" / "ckpt-20.index").exists())
    assert len(jobs) == 2  # named after each job's overrides, so a rerun of the sweep resumes each job
    assert "optimizer.learning_rate=0.001" in jobs[0] and "optimizer.learning_rate=0.01" in jobs[1]
    assert all((sweep / job / "tensorboard").is_dir() and (sweep / job / "config.yaml").exists() for job in jobs)


@pytest.mark.slow
def test_progress_bar_on_a_terminal(run_dir: Path) -> None:
    """On a real pseudo-terminal, progress is a bar with rate and ETA rather than log lines."""
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    process = subprocess.Popen([sys.executable, str(TRAIN_PY), f"run_dir={run_dir}", "trainer.max_steps=40",
                                "data.num_examples=1024", "data.eval_examples=128"],
                               stdout=secondary, stderr=secondary, cwd=PROJECT_ROOT, env=subprocess_env())
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert process.wait(timeout=120) == 0
    screen = b"".join(chunks).decode(errors="replace")
    assert "40/40" in screen and "step/s" in screen, screen[-2000:]
    assert "steps/s, eta" not in screen


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [("model=cnn",), ("optimizer=sgd",),
                                       ("optimizer=adamw", "optimizer.schedule.warmup_steps=10")])
def test_other_groups_train(run_dir: Path, overrides: tuple[str, ...]) -> None:
    result = run_train(run_dir, *overrides, "trainer.max_steps=20", "data.num_examples=1024", "data.eval_examples=128",
                       tiny=False)
    assert_ok(result)
    assert (run_dir / "checkpoints" / "ckpt-20.index").exists()
