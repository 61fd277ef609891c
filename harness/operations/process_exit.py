"""Ending the process: quickly, once everything it wrote is on disk.

Owns: the last step of `train.py`. The interpreter's normal teardown destroys TensorFlow's objects
one by one, about a second that every restart, test and sweep job pays for nothing: everything
the run writes (checkpoints, event files, the run record, exports) is already closed or waited
for when training returns. So a single process flushes logging and stdio and leaves with
`os._exit`. A process that joined a multi-worker cluster exits normally instead: TensorFlow's
coordination service runs its shutdown barrier with the other workers at teardown.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import NoReturn

from harness.config.schema import parse_signals
from harness.errors import ConfigError


def exit_process(code: int) -> NoReturn:
    """Exit with `code`, skipping interpreter teardown unless this process joined a cluster."""
    strategy = sys.modules.get("harness.distributed.strategy")
    if strategy is not None and strategy.joined_cluster():
        raise SystemExit(code)
    logging.shutdown()  # flushes and closes every handler, Hydra's job log file included
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def ignore_signals_while_exiting(signal_names: list[str]) -> None:
    """Ignore the stop signals from now on: the run is over and the process is exiting.

    Python resets its own handlers to the default during interpreter teardown, so a late SIGTERM
    would otherwise turn "finished" (or "preempted, saved") into "killed by a signal". Ignored
    signals stay ignored through teardown. Call only when the process is about to exit.
    """
    for name in signal_names:
        try:
            signal.signal(parse_signals([name])[0], signal.SIG_IGN)
        except (ConfigError, ValueError):  # unknown name (reported earlier) or not the main thread
            continue
