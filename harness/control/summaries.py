"""TensorBoard event files that stay one clean curve across kills and restarts.

Owns: `${run_dir}/tensorboard`. Each process appends to an event file of its own, named to sort
after every existing one, and starts it with a `SessionLog.START` event at (restored step + 1).
TensorBoard's loaders (the data server and the Python `EventAccumulator`) drop every point at or
after a restart's START step that was read before it, so points a killed process logged after
its last checkpoint vanish, and the steps the new process redoes appear once. The controller
flushes at every log step (live TensorBoard sees them) and before each checkpoint (no step
logged before a checkpoint can be lost).
Only the chief writes; other workers get a no-op writer.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Mapping
from typing import Any

import tensorflow as tf
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

_TIMESTAMP = re.compile(r"tfevents\.(\d+)\.")


class Summaries:
    """Scalar and hparams writer for one process. Use as a context manager (closes the file)."""

    def __init__(self, log_dir: str, *, enabled: bool, start_step: int) -> None:
        self.log_dir = log_dir
        self.enabled = enabled
        self._restart_step = start_step
        self._file = None
        if not enabled:
            return
        tf.io.gfile.makedirs(log_dir)
        self.path = os.path.join(log_dir, _next_event_file_name(log_dir))
        self._file = tf.io.gfile.GFile(self.path, "wb")
        self._records = RecordWriter(self._file)
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        self.restart_at(start_step)

    @property
    def start_marker_step(self) -> int:
        """The step of the latest `SessionLog.START`: what is written there, a later restart from the
        same checkpoint replaces rather than duplicates (per-start values such as the run record)."""
        return self._restart_step + 1

    def restart_at(self, step: int) -> None:
        """Mark that training continues from `step`: loaders drop the points logged after it so far.

        Written at start-up (after a restore) and after a divergence rollback.
        """
        self._restart_step = step
        if not self.enabled:
            return
        self._write(event_pb2.Event(wall_time=time.time(), step=step + 1,
                                    session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
        self.flush()

    def __enter__(self) -> Summaries:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Write one scalar per tag at `step`."""
        if not self.enabled:
            return
        # `simple_value` scalars, not TF2 tensor scalars: every TensorBoard loader, including the
        # Python EventAccumulator, purges these on a restart's START event (tensors it does not).
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
                                             for tag, value in values.items()])
        self._write(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def hparams(self, config: Mapping[str, Any]) -> None:
        """Record the run's hyperparameters (flattened config) for TensorBoard's HParams tab."""
        if not self.enabled:
            return
        from tensorboard.plugins.hparams import summary_v2 as hparams_summary  # only fresh runs pay for it

        flat = {key: value if isinstance(value, (bool, int, float, str)) else str(value)
                for key, value in _flatten(config).items()}
        self._write(event_pb2.Event(wall_time=time.time(), step=0, summary=hparams_summary.hparams_pb(flat)))

    def flush(self) -> None:
        if self._file is not None:
            self._records.flush()
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self.flush()
            self._file.close()
            self._file = None

    def _write(self, event: event_pb2.Event) -> None:
        self._records.write(event.SerializeToString())


def _next_event_file_name(log_dir: str) -> str:
    """An event file name sorting after all existing ones (loaders read files in name order)."""
    existing = [int(m.group(1)) for name in tf.io.gfile.listdir(log_dir) if (m := _TIMESTAMP.search(name))]
    timestamp = max([int(time.time())] + [t + 1 for t in existing])
    return f"events.out.tfevents.{timestamp:010d}.{socket.gethostname()}.{os.getpid()}.v2"


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        elif value is not None:
            flat[name] = value
    return flat
