"""harness/distributed/gang.py with real processes and real signals (small Python workers, no TensorFlow)."""

from __future__ import annotations

import signal
import sys
import textwrap
import time

import pytest

from harness.distributed.gang import gang_exit_code, preemption_exit_code_of
from tests.background import BackgroundRun
from tests.conftest import subprocess_env

# A worker that exits 42 on SIGTERM (like train.py after saving), else after `seconds`.
STOPPABLE = textwrap.dedent("""
    import signal, sys, time
    signal.signal(signal.SIGTERM, lambda *_: (print("saving", flush=True), sys.exit(42)))
    print("ready", flush=True)
    time.sleep(float(sys.argv[1]))
""")


def gang_command(*workers: list[str], grace_seconds: float = 60) -> list[str]:
    """A Python process running a `Gang` of the given worker commands."""
    program = textwrap.dedent(f"""
        import os, sys
        from harness.distributed.gang import Gang, WorkerSpec
        workers = [WorkerSpec(name=f"w{{i}}", command=command, env=dict(os.environ)) for i, command in
                   enumerate({list(workers)!r})]
        sys.exit(Gang(workers, preemption_exit_code=42, grace_seconds={grace_seconds}).run())
    """)
    return [sys.executable, "-c", program]


def python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


@pytest.mark.parametrize(("codes", "expected"), [
    ([0, 0], 0), ([42, 42], 42), ([0, 42], 42), ([137, 1], 137), ([42, 1], 1), ([2, 2], 2),
])
def test_gang_exit_code(codes: list[int], expected: int) -> None:
    assert gang_exit_code(codes, preemption_exit_code=42) == expected


def test_the_preemption_code_comes_from_the_workers_overrides() -> None:
    assert preemption_exit_code_of(["trainer.max_steps=9"], default=42) == 42
    assert preemption_exit_code_of(["preemption.exit_code=85", "seed=1"], default=42) == 85
    assert preemption_exit_code_of(["preemption.exit_code=85", "preemption.exit_code=99"], default=42) == 99


def test_output_is_prefixed_and_success_is_zero() -> None:
    command = gang_command(python("print('hello')"), python("import sys; print('to stderr', file=sys.stderr)"))
    with BackgroundRun(command, env=subprocess_env()) as gang:
        assert gang.finish(timeout=30) == 0
        lines = gang.lines
    assert "[w0] hello" in lines and "[w1] to stderr" in lines
    assert "[gang] gang exited with code 0" in lines


def test_a_failed_worker_gets_the_others_killed_after_the_grace_period() -> None:
    command = gang_command(python("import sys; sys.exit(3)"), python(STOPPABLE, "600"), grace_seconds=1)
    with BackgroundRun(command, env=subprocess_env()) as gang:
        started = time.monotonic()
        assert gang.finish(timeout=30) == 3, gang.tail()
        assert time.monotonic() - started < 30
        lines = gang.lines
    assert "[gang] killing w1" in " ".join(lines)
    assert "[gang] w1 exited with code 137" in lines


def test_sigterm_is_forwarded_and_a_preempted_gang_exits_with_the_preemption_code() -> None:
    command = gang_command(python(STOPPABLE, "600"), python(STOPPABLE, "600"))
    with BackgroundRun(command, env=subprocess_env()) as gang:
        gang.wait_for(r"^\[w0\] ready", timeout=30)
        gang.wait_for(r"^\[w1\] ready", timeout=30)
        gang.process.send_signal(signal.SIGTERM)
        assert gang.finish(timeout=30) == 42, gang.tail()
        lines = gang.lines
    assert "[w0] saving" in lines and "[w1] saving" in lines
