"""User-fixable errors and the process exit codes the harness documents.

Owns: the one exception type a user can act on (`HarnessError`) and the table of exit codes that
schedulers and scripts match on. Internal bugs are *not* `HarnessError`s and keep their
tracebacks.
"""

from __future__ import annotations

import enum
import re
import sys
from collections.abc import Callable
from typing import Any


class ExitCode(enum.IntEnum):
    """Exit codes of `train.py`: the table in the README. Schedulers match on them.

    Requeue on PREEMPTED, STALLED and (after a pause) STORAGE_FAILED; do not requeue on
    USER_ERROR, DIVERGED, LEASE_CONFLICT or CRASH_LOOP: rerunning the same command cannot help.
    The preemption code is configurable (`preemption.exit_code`); the value here is its default.
    """

    SUCCESS = 0  # reached trainer.max_steps (or it was already reached)
    INTERNAL_ERROR = 1  # a bug or an unexpected TensorFlow failure: traceback printed
    USER_ERROR = 2  # bad config, data, checkpoint, filesystem or a refused config change: message printed
    DIVERGED = 3  # loss NaN/Inf or above trainer.loss_upper_bound after trainer.max_rollbacks rollbacks
    STALLED = 4  # the hang watchdog fired, or a peer worker was lost: restart the job
    STORAGE_FAILED = 5  # checkpoint.max_consecutive_failures saves in a row failed (disk full, permissions)
    LEASE_CONFLICT = 6  # another live process holds checkpoint.dir's lease, or took it over from us
    CRASH_LOOP = 7  # trainer.max_crash_restarts crashes in a row at the same step: refused to start
    PREEMPTED = 42  # a signal asked us to stop; a checkpoint at the current step was saved


RESERVED_EXIT_CODES = frozenset(int(code) for code in ExitCode if code != ExitCode.PREEMPTED)
# Exits that rerunning the same command cannot fix: the launch recipes (scripts/) do not retry them.
NOT_RETRYABLE = (ExitCode.USER_ERROR, ExitCode.DIVERGED, ExitCode.LEASE_CONFLICT, ExitCode.CRASH_LOOP)


class HarnessError(Exception):
    """An error the user can fix: the message names the key/file, what was received and expected."""

    exit_code: ExitCode = ExitCode.USER_ERROR


class ConfigError(HarnessError):
    """A configuration value is invalid."""


class CheckpointError(HarnessError):
    """A checkpoint cannot be used (mismatched model, unreadable directory, nothing intact)."""


class DataError(HarnessError):
    """An input data file or data setting is invalid."""


class DivergedError(HarnessError):
    """The loss kept diverging after every allowed rollback."""

    exit_code = ExitCode.DIVERGED


class StalledError(HarnessError):
    """Training stopped making progress: a peer worker was lost."""

    exit_code = ExitCode.STALLED


class StorageError(HarnessError):
    """Checkpoints could not be written, repeatedly; every earlier checkpoint is intact."""

    exit_code = ExitCode.STORAGE_FAILED


class LeaseConflictError(HarnessError):
    """Another process holds (or took over) the lease on checkpoint.dir."""

    exit_code = ExitCode.LEASE_CONFLICT


class CrashLoopError(HarnessError):
    """The run crashed too many times in a row at the same step; restarting cannot help."""

    exit_code = ExitCode.CRASH_LOOP


def exit_code_of(run: Callable[[Any], Any], argument: Any) -> int:
    """Call `run(argument)`; map its outcome or a `HarnessError` to the process exit code.

    A `HarnessError` is printed once as `error: <message>` on stderr, without a traceback, and
    exits with its own code. Other exceptions propagate (a bug: the traceback is the useful report).
    """
    try:
        outcome = run(argument)
    except HarnessError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return int(error.exit_code)
    return int(getattr(outcome, "exit_code", ExitCode.SUCCESS))


def error_summary(error: BaseException, *, limit: int = 300) -> str:
    """The first line of an exception's message, without TensorFlow's op-location decorations:
    what a one-paragraph error message quotes of the failure underneath it."""
    text = getattr(error, "message", None) or str(error)
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:\w+\]", "", text.strip())
    lines = [line.strip() for line in text.splitlines() if line.strip() and "Graph execution" not in line]
    return (lines[0] if lines else type(error).__name__)[:limit]
