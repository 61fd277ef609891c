"""This host's processes, cores and local disks, as several packages need them: whether a process runs (the
lease, checkpoint clean-up), the cores and accelerators the training step and the input share (file reads,
thread pools), and making a written file or a directory's entries durable (checkpoints, converted data
shards)."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity on Linux; every core elsewhere)."""
    if hasattr(os, "sched_getaffinity"):  # not on macOS or Windows
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def has_accelerators() -> bool:
    """Whether this host has GPUs or TPUs, i.e. whether the training step leaves its CPU cores to the input.
    Asks for physical devices only: the runtime's devices can still be configured afterwards."""
    import tensorflow as tf  # here: the lease and the converter use this module without TensorFlow's runtime

    return any(tf.config.list_physical_devices(kind) for kind in ("GPU", "TPU"))


def process_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def fsync(path: str) -> None:
    """Flush a local file, or a directory's entries (new, renamed and deleted names), to the disk.

    A no-op for remote paths (`gs://...`): their filesystems give their own guarantees on close.
    """
    if "://" in path:
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
