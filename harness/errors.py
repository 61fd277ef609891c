"""User-fixable errors and the process exit codes the harness documents.

Owns: the one exception type a user can act on (`HarnessError`) and the table of exit codes that
schedulers and scripts match on. Internal bugs are *not* `HarnessError`s and keep their
tracebacks.
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Callable
from typing import Any


class ExitCode(enum.IntEnum):
    """Exit codes of `train.py` (documented in the README).

    The preemption code is configurable (`preemption.exit_code`); the value here is its default.
    """

    SUCCESS = 0
    INTERNAL_ERROR = 1  # a bug or an unexpected TensorFlow failure: traceback printed
    USER_ERROR = 2  # bad config, data, checkpoint or filesystem: one-paragraph message
    PREEMPTED = 42  # a signal asked us to stop; a checkpoint at the current step was saved


class HarnessError(Exception):
    """An error the user can fix: the message names the key/file, what was received and expected."""


class ConfigError(HarnessError):
    """A configuration value is invalid."""


class CheckpointError(HarnessError):
    """A checkpoint cannot be used (mismatched model, unreadable directory, nothing intact)."""


class DataError(HarnessError):
    """An input data file or data setting is invalid."""


def exit_code_of(run: Callable[[Any], Any], argument: Any) -> int:
    """Call `run(argument)`; map its outcome or a `HarnessError` to the process exit code.

    A `HarnessError` is printed once as `error: <message>` on stderr, without a traceback.
    Other exceptions propagate (a bug: the traceback is the useful report).
    """
    try:
        outcome = run(argument)
    except HarnessError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return ExitCode.USER_ERROR
    return int(getattr(outcome, "exit_code", ExitCode.SUCCESS))
