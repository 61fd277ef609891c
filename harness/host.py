"""Facts about this host's processes, needed by both the lease and checkpoint clean-up."""

from __future__ import annotations

import os


def process_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
