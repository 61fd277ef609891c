"""A test helper: a command running in the background whose output lines can be waited for.

For tests that send real signals at a given moment of a real run (tests/test_distributed.py,
tests/test_launch_recipes.py): `wait_for(pattern)` blocks until an output line matches.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

from tests.conftest import PROJECT_ROOT


class BackgroundRun:
    """`command` in its own session, stdout and stderr lines collected as they arrive.

    Leaving the `with` block SIGKILLs the whole session: the command and every child it started.
    """

    def __init__(self, command: list[str], *, env: dict[str, str], cwd: Path = PROJECT_ROOT) -> None:
        self.process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, start_new_session=True)
        self.lines: list[str] = []
        self._ended = False  # the output reached its end
        self._arrived = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._arrived:
                self.lines.append(line.rstrip("\n"))
                self._arrived.notify_all()
        with self._arrived:
            self._ended = True
            self._arrived.notify_all()

    def __enter__(self) -> BackgroundRun:
        return self

    def __exit__(self, *exc_info: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    @property
    def output(self) -> str:
        with self._arrived:
            return "\n".join(self.lines)

    def tail(self, count: int = 80) -> str:
        with self._arrived:
            return "\n".join(self.lines[-count:])

    def wait_for(self, pattern: str, *, timeout: float) -> re.Match[str]:
        """The match of the first output line matching `pattern`; AssertionError after `timeout` s."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                for line in self.lines:
                    if match := re.search(pattern, line):
                        return match
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._ended:
                    raise AssertionError(f"no output line matching {pattern!r} within {timeout}s; last lines:\n"
                                         + "\n".join(self.lines[-80:]))
                self._arrived.wait(timeout=min(remaining, 1.0))

    def finish(self, *, timeout: float) -> int:
        """The exit code, once the process exited and its last line was read; AssertionError after `timeout` s."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout}s; last lines:\n{self.tail()}") from None
        deadline = time.monotonic() + 10
        with self._arrived:
            while not self._ended and time.monotonic() < deadline:
                self._arrived.wait(timeout=0.5)
        return code


def sigkill_after_checkpoint(command: list[str], step: int, *, env: dict[str, str], timeout: float = 180) -> None:
    """Run `command` (train.py) until it logs the checkpoint of `step`, then SIGKILL it, as a scheduler would."""
    with BackgroundRun(command, env=env) as run:
        run.wait_for(rf"saved checkpoint ckpt-{step}\b", timeout=timeout)
        run.process.send_signal(signal.SIGKILL)
        assert run.finish(timeout=30) == -signal.SIGKILL
