"""harness/operations/watchdog.py: phase limits in-process (the watchdog thread is never started here: a hang
would end pytest itself), and the real hang in a child process, which must exit with code 4 after a
stack dump and the on_hang callback."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.config.schema import WatchdogConfig
from harness.errors import ExitCode
from harness.operations.watchdog import Watchdog
from tests.conftest import PROJECT_ROOT, subprocess_env


def watchdog(**config: float) -> Watchdog:
    return Watchdog(WatchdogConfig(**config))


def run_phase(dog: Watchdog, kind: str, *, seconds: float, units: int = 1) -> None:
    with dog.phase(kind, units=units):
        time.sleep(seconds)


def test_the_first_phase_of_each_kind_gets_first_call_seconds() -> None:
    dog = watchdog(factor=10.0, min_seconds=0.1, first_call_seconds=1800.0)
    assert dog.limit_seconds("train", 50) == 1800.0
    run_phase(dog, "train", seconds=0.02, units=2)
    assert dog.limit_seconds("train", 50) < 1800.0
    assert dog.limit_seconds("eval") == 1800.0  # kinds are timed separately
    assert dog.limit_seconds("save") == 1800.0


def test_the_limit_is_factor_times_the_slowest_per_unit_times_units() -> None:
    dog = watchdog(factor=10.0, min_seconds=0.001, first_call_seconds=1800.0)
    run_phase(dog, "train", seconds=0.1, units=4)  # 0.025 s per step
    per_step = dog.limit_seconds("train", 1) / 10.0
    assert 0.025 <= per_step < 0.1
    assert dog.limit_seconds("train", 40) == pytest.approx(10.0 * per_step * 40)
    run_phase(dog, "train", seconds=0.01, units=4)  # faster: the slowest so far still counts
    assert dog.limit_seconds("train", 1) == pytest.approx(10.0 * per_step)
    run_phase(dog, "train", seconds=0.3, units=1)  # 0.3 s per step: the new slowest
    assert 0.3 <= dog.limit_seconds("train", 1) / 10.0 < 0.6


def test_the_limit_is_never_below_min_seconds() -> None:
    dog = watchdog(factor=10.0, min_seconds=5.0, first_call_seconds=1800.0)
    run_phase(dog, "save", seconds=0.01)
    assert dog.limit_seconds("save") == 5.0
    assert dog.limit_seconds("train", 1000) == 1800.0


def test_a_phase_that_raises_is_not_measured() -> None:
    dog = watchdog(factor=10.0, min_seconds=0.001, first_call_seconds=1800.0)
    with pytest.raises(RuntimeError, match="boom"), dog.phase("eval"):
        time.sleep(0.05)
        raise RuntimeError("boom")
    assert dog.limit_seconds("eval") == 1800.0
    run_phase(dog, "eval", seconds=0.01)
    slow_failure_limit = dog.limit_seconds("eval")
    with pytest.raises(RuntimeError), dog.phase("eval"):
        time.sleep(0.3)
        raise RuntimeError("boom")
    assert dog.limit_seconds("eval") == slow_failure_limit


def test_every_limit_allows_for_the_save_retries_back_off() -> None:
    dog = Watchdog(WatchdogConfig(factor=10.0, min_seconds=0.5, first_call_seconds=60.0), patience_seconds=7.0)
    assert dog.limit_seconds("save") == dog.limit_seconds("train", 50) == 60.0 + 7.0
    run_phase(dog, "save", seconds=0.01)
    assert dog.limit_seconds("save") == 0.5 + 7.0  # min_seconds beats 10 x 0.01 s
    run_phase(dog, "train", seconds=0.01)
    assert dog.limit_seconds("train") == 0.5 + 7.0


# ---------------------------------------------------------------------------------------------
# The real hang, in a child process (no TensorFlow: it starts in a fraction of a second)
# ---------------------------------------------------------------------------------------------
CHILD = textwrap.dedent("""
    import logging, sys, threading, time
    from harness.config.schema import WatchdogConfig
    from harness.operations import watchdog
    from harness.operations.watchdog import Watchdog

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    marker, mode = sys.argv[1], sys.argv[2]
    watchdog.BOOKKEEPING_SECONDS = 1.0

    def on_hang(kind):
        if mode == "failing_callback":
            raise OSError("run record unwritable")
        if mode == "blocking_callback":  # the run record is on the filesystem that hung
            threading.Event().wait()
        with open(marker, "w") as handle:
            handle.write(kind)

    def stuck_in_collective():
        time.sleep(30)

    if mode == "learned_limit":  # a long first_call_seconds: only the measured limit can fire
        config = WatchdogConfig(factor=10.0, min_seconds=0.3, first_call_seconds=60.0)
    else:
        config = WatchdogConfig(enabled=mode != "disabled", factor=10.0, min_seconds=0.1, first_call_seconds=0.5)
    back_off = 1.45 if mode == "backing_off" else 0.0  # the most the save may sleep between its retries
    with Watchdog(config, on_hang=on_hang, patience_seconds=back_off) as dog:
        if mode == "learned_limit":
            with dog.phase("train", units=5):
                time.sleep(0.05)  # 0.01 s per step: the limit of 5 steps becomes about 0.5 s
            print("first loop done", flush=True)
            with dog.phase("train", units=5):
                stuck_in_collective()
        elif mode == "backing_off":  # a save retried 3 times, 1.5 s in all: past 0.5 s, but not past 0.5 s + back-off
            with dog.phase("save"):
                for _ in range(3):
                    time.sleep(0.05)  # the failed write
                    time.sleep(0.45)  # the back-off
        elif mode == "in_time":
            with dog.phase("save"):
                time.sleep(0.1)
            time.sleep(1.2)  # idle after the phase, past its limit and the first poll: nothing to time
        else:
            with dog.phase("save"):
                # disabled: long enough that an enabled watchdog (first poll after 1 s) would fire
                stuck_in_collective() if mode != "disabled" else time.sleep(1.5)
    print("finished normally", flush=True)
""")


@dataclass(frozen=True)
class Child:
    result: subprocess.CompletedProcess[str]
    seconds: float  # an upper bound: children are collected one after another
    marker: Path  # written by on_hang


MODES = ("hang", "learned_limit", "failing_callback", "blocking_callback", "disabled", "in_time", "backing_off")


@pytest.fixture(scope="module")
def children(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Child]:
    """Every scenario's child process, started together so the module takes as long as the slowest one."""
    directory = tmp_path_factory.mktemp("watchdog")
    started = time.monotonic()
    running = {mode: subprocess.Popen([sys.executable, "-c", CHILD, str(directory / f"{mode}.hang"), mode],
                                      cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=subprocess_env()) for mode in MODES}
    finished = {}
    for mode, process in running.items():
        try:
            stdout, stderr = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        finished[mode] = Child(result, time.monotonic() - started, directory / f"{mode}.hang")
    return finished


def test_a_hung_phase_dumps_every_stack_records_the_hang_and_exits_4(children: dict[str, Child]) -> None:
    result, elapsed, marker = children["hang"].result, children["hang"].seconds, children["hang"].marker
    assert result.returncode == ExitCode.STALLED == 4, result.stderr
    assert elapsed < 10.0
    assert "watchdog: save has run for" in result.stderr
    assert "over its limit of 0.5 s" in result.stderr
    assert "Thread 0x" in result.stderr
    assert "in stuck_in_collective" in result.stderr  # the main thread's stack shows where it hangs
    assert marker.read_text() == "save"
    assert "finished normally" not in result.stdout


def test_after_the_first_phase_the_measured_limit_applies(children: dict[str, Child]) -> None:
    child = children["learned_limit"]
    result, elapsed, marker = child.result, child.seconds, child.marker
    assert result.returncode == 4, result.stderr
    assert elapsed < 10.0  # first_call_seconds=60 did not apply
    assert result.stdout.splitlines() == ["first loop done"]
    limit = float(re.search(r"watchdog: train \(5 steps\) has run for [\d.]+ s, over its limit of ([\d.]+) s",
                            result.stderr).group(1))
    assert 0.5 <= limit < 1.5  # 10 x about 0.01 s per step x 5 steps, above min_seconds=0.3
    assert marker.read_text() == "train"


def test_a_failing_on_hang_callback_does_not_stop_the_exit(children: dict[str, Child]) -> None:
    result, elapsed = children["failing_callback"].result, children["failing_callback"].seconds
    assert result.returncode == 4, result.stderr
    assert elapsed < 10.0
    assert "watchdog: recording the hang failed: run record unwritable" in result.stderr


def test_an_on_hang_callback_that_blocks_does_not_stop_the_exit(children: dict[str, Child]) -> None:
    result, elapsed = children["blocking_callback"].result, children["blocking_callback"].seconds
    assert result.returncode == 4, result.stderr
    assert elapsed < 10.0
    assert "watchdog: save has run for" in result.stderr and "finished normally" not in result.stdout


@pytest.mark.parametrize("mode", ["disabled", "in_time", "backing_off"])
def test_no_exit_when_disabled_or_every_phase_ends_in_time(children: dict[str, Child], mode: str) -> None:
    result, marker = children[mode].result, children[mode].marker
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["finished normally"]
    assert "watchdog:" not in result.stderr
    assert not marker.exists()
