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
import sys
from typing import NoReturn


def exit_process(code: int) -> NoReturn:
    """Exit with `code`, skipping interpreter teardown unless this process joined a cluster."""
    strategy = sys.modules.get("harness.strategy")
    if strategy is not None and strategy.joined_cluster():
        raise SystemExit(code)
    logging.shutdown()  # flushes and closes every handler, Hydra's job log file included
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
