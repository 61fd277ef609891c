"""Exact resume under real SIGKILL/SIGTERM/SIGINT/SIGUSR1, and one clean TensorBoard curve after it.

The kill schedules are random but seeded; every assertion holds for any schedule.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from scripts.tooling.chaos import compare_checkpoints, run_attempt, run_chaos
from tests.conftest import (
    PROJECT_ROOT,
    assert_ok,
    checkpoint_values,
    event_scalars,
    run_train,
    subprocess_env,
    train_command,
)

pytestmark = pytest.mark.slow

# Deterministic, with dropout (its RNG is not in tf.train.Checkpoint: derived from the step instead),
# a cosine schedule with warmup (position from the checkpointed iteration count), frequent checkpoints
# so that kills land in writes, and logging between checkpoints so that killed processes leave stale
# TensorBoard points behind.
EXACT = ("deterministic=true", "model.dropout=0.2", "model.hidden=[64]", "optimizer.schedule.name=cosine",
         "optimizer.schedule.warmup_steps=20", "trainer.max_steps=400", "trainer.steps_per_loop=5",
         "trainer.log_every=5", "trainer.eval_every=100", "checkpoint.every_steps=25")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every interrupted one must match bit for bit."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    assert_ok(run_train(run_dir, *EXACT))
    return run_dir


def final_checkpoint(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "ckpt-400"


def assert_same_curve(run_dir: Path, reference_run: Path) -> None:
    """Each logged step appears once, in order, with the reference run's value."""
    scalars, expected = event_scalars(run_dir / "tensorboard"), event_scalars(reference_run / "tensorboard")
    for tag in ("train/loss", "train/learning_rate", "eval/accuracy"):
        steps = [step for step, _ in scalars[tag]]
        assert steps == [step for step, _ in expected[tag]], f"{tag}: {steps}"
        assert [value for _, value in scalars[tag]] == pytest.approx([value for _, value in expected[tag]], abs=1e-6)


def test_kills_at_random_moments_end_bit_identical(tmp_path: Path, reference_run: Path) -> None:
    run_dir = tmp_path / "run"
    report = run_chaos(train_command(run_dir, *EXACT), kills=4, signals=[signal.SIGKILL, signal.SIGTERM],
                       max_jitter=0.02, seed=11, cwd=str(PROJECT_ROOT), env=subprocess_env())
    print(report.summary())
    assert report.completed and report.kills == 4
    assert {a.signal_sent for a in report.attempts[:-1]} == {"SIGKILL", "SIGTERM"}
    for attempt in report.attempts[:-1]:
        assert attempt.exit_code == (-signal.SIGKILL if attempt.signal_sent == "SIGKILL" else 42), attempt.output
    resumed = [a.resumed_from for a in report.attempts[1:]]
    assert any(step and step > 0 for step in resumed), f"never resumed from a checkpoint: {resumed}"
    assert compare_checkpoints(final_checkpoint(run_dir), final_checkpoint(reference_run)) == []
    assert_same_curve(run_dir, reference_run)


def test_sigterm_saves_the_step_reached_and_resumes_with_zero_steps_lost(tmp_path: Path, reference_run: Path) -> None:
    run_dir = tmp_path / "run"
    command = train_command(run_dir, *EXACT)
    stopped = run_attempt(command, kill_signal=signal.SIGTERM, kill_fraction=0.4, cwd=str(PROJECT_ROOT),
                          env=subprocess_env())
    assert stopped.exit_code == 42, stopped.output[-3000:]
    assert stopped.stopped_at is not None and 0 < stopped.stopped_at < 400
    saved = checkpoint_values(run_dir / "checkpoints" / f"ckpt-{stopped.stopped_at}")
    assert saved["step/.ATTRIBUTES/VARIABLE_VALUE"] == stopped.stopped_at
    resumed = run_attempt(command, kill_signal=None, cwd=str(PROJECT_ROOT), env=subprocess_env())
    assert resumed.exit_code == 0 and resumed.resumed_from == stopped.stopped_at  # zero steps redone
    assert compare_checkpoints(final_checkpoint(run_dir), final_checkpoint(reference_run)) == []
    assert_same_curve(run_dir, reference_run)


@pytest.mark.parametrize(("sent", "overrides", "expected_code"), [
    (signal.SIGINT, (), 42),
    (signal.SIGUSR1, ("preemption.exit_code=85",), 85),
])
def test_other_stop_signals_and_a_custom_exit_code(tmp_path: Path, sent: signal.Signals, overrides: tuple[str, ...],
                                                  expected_code: int) -> None:
    run_dir = tmp_path / "run"
    attempt = run_attempt(train_command(run_dir, *EXACT, *overrides), kill_signal=sent, kill_fraction=0.4,
                          cwd=str(PROJECT_ROOT), env=subprocess_env())
    assert attempt.exit_code == expected_code, attempt.output[-3000:]
    assert f"received {sent.name}" in attempt.output
    assert (run_dir / "checkpoints" / f"ckpt-{attempt.stopped_at}.index").exists()


def test_repeated_signals_while_saving_do_not_corrupt_the_checkpoint(tmp_path: Path) -> None:
    """The scheduler keeps signalling from the first SIGTERM until the process is gone.

    The first two signals go back to back, so both reach Python before the save can finish (their
    handlers run in order once the step in flight returns); the rest keep coming during the save
    and the exit, and none may change the outcome.
    """
    run_dir = tmp_path / "run"
    command = train_command(run_dir, "model.hidden=[1024,1024]", "trainer.max_steps=2000", "trainer.steps_per_loop=1",
                            "checkpoint.every_steps=1000")
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=subprocess_env())
    assert process.stdout is not None
    for line in process.stdout:
        if "step " in line and "/2000" in line:
            break

    def keep_signalling() -> None:
        process.send_signal(signal.SIGTERM)
        process.send_signal(signal.SIGINT)
        while process.poll() is None:  # send_signal is a no-op once the process is reaped
            process.send_signal(signal.SIGTERM)
            time.sleep(0.01)

    signalled = time.monotonic()
    signaller = threading.Thread(target=keep_signalling)
    signaller.start()
    output = process.stdout.read()
    assert process.wait(timeout=60) == 42, output[-3000:]
    signaller.join()
    assert time.monotonic() - signalled < 30  # well inside a cloud VM's notice
    assert "again: still saving" in output
    stopped_at = int(output.split("stopped at step ")[1].split()[0])
    assert checkpoint_values(run_dir / "checkpoints" / f"ckpt-{stopped_at}")["step/.ATTRIBUTES/VARIABLE_VALUE"] \
        == stopped_at
    resumed = run_train(run_dir, "model.hidden=[1024,1024]", f"trainer.max_steps={stopped_at + 2}",
                        "trainer.steps_per_loop=1")
    assert_ok(resumed)
    assert f"at step {stopped_at}" in resumed.stdout


def test_chaos_script_then_tensorboard_server_shows_one_clean_curve(tmp_path: Path) -> None:
    """scripts/chaos.py as a user runs it, then what users see: a real `tensorboard` (default fast
    loader) over its HTTP API, showing each step once although killed processes left stale points."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "scripts/chaos.py", "--kills", "3", "--signals", "SIGKILL", "--max-jitter", "0.02",
               "--seed", "2", "--reference", "--", *train_command(run_dir, *EXACT)]
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, env=subprocess_env(),
                            timeout=600)
    assert_ok(result)
    assert "kills: 3" in result.stdout
    assert "bit-identical to the uninterrupted reference: yes" in result.stdout
    raw_steps = _raw_event_steps(run_dir / "tensorboard", "train/loss")
    assert len(raw_steps) > len(set(raw_steps)), "no stale points were written: the test would prove nothing"
    expected_steps = [step for step, _ in event_scalars(tmp_path / "run-reference" / "tensorboard")["train/loss"]]
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(run_dir / "tensorboard"),
                               "--host", "127.0.0.1", "--port", str(port), "--load_fast=true", "--reload_interval=1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env())
    try:
        points = _poll_scalars(port, "train/loss", expected=len(expected_steps))
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert [step for _, step, _ in points] == expected_steps


def _raw_event_steps(log_dir: Path, tag: str) -> list[int]:
    """Steps of every event with `tag` in every file, as written (no loader's purging)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            steps.extend(event.step for value in event.summary.value if value.tag == tag)
    return steps


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _poll_scalars(port: int, tag: str, *, expected: int, timeout: float = 90) -> list[list[float]]:
    url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run=.&tag={urllib.parse.quote(tag)}"
    deadline, points = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                points = json.loads(response.read())
            if len(points) >= expected:
                time.sleep(3)  # one more reload cycle: nothing else may arrive
                with urllib.request.urlopen(url, timeout=5) as response:
                    return json.loads(response.read())
        except (OSError, ValueError):
            pass
        time.sleep(1)
    raise AssertionError(f"tensorboard served {len(points)} points of {tag}, expected {expected}: {points}")


def test_sigkill_while_checkpoints_are_being_written(tmp_path: Path) -> None:
    """52 MB of state saved every step: most kills land inside a checkpoint write, synchronous or
    async (written by a background thread while training goes on). With max_to_keep=1 a save that
    deleted the old checkpoint before the new one was complete would send a successor back to an
    older step."""
    every_step = ("deterministic=true", "model.hidden=[2048,2048]", "model.dropout=0.1", "checkpoint.every_steps=1",
                  "checkpoint.max_to_keep=1", "trainer.max_steps=25", "trainer.steps_per_loop=1", "trainer.log_every=1",
                  "trainer.eval_every=0")
    reference = tmp_path / "reference"
    assert_ok(run_train(reference, *every_step))
    for async_save, kills in (("false", 2), ("true", 2)):
        run_dir = tmp_path / f"run-async-{async_save}"
        report = run_chaos(train_command(run_dir, *every_step, f"checkpoint.async={async_save}"), kills=kills,
                           signals=[signal.SIGKILL], max_jitter=0.3, seed=4, cwd=str(PROJECT_ROOT),
                           env=subprocess_env())
        print(report.summary())
        assert report.completed and report.kills == kills
        for killed, successor in zip(report.attempts, report.attempts[1:]):
            assert successor.resumed_from is not None and successor.resumed_from >= (killed.resumed_from or 0)
        assert compare_checkpoints(run_dir / "checkpoints" / "ckpt-25", reference / "checkpoints" / "ckpt-25") == []
        leftovers = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        assert leftovers == ["checkpoint", "ckpt-25.data-00000-of-00001", "ckpt-25.index"], async_save
