"""One writer per checkpoint directory: a lease file taken at start and renewed while training.

Owns: `<checkpoint.dir>/LEASE`. A scheduler may restart a job while the old incarnation is still
alive (a network partition, a VM that is slow to die); two processes must never write the same
checkpoints. Guarantees:
- `acquire` refuses (`LeaseConflictError`, naming the holder) only a holder shown to be alive:
  its heartbeat advances while we watch (at most `lease.renew_seconds` plus a margin). A lease
  that is not renewed is waited out until `lease.expiry_seconds` after its last renewal, then
  taken over with a warning; a holder on this host whose process is gone is taken over at once.
  So a job restarted after SIGKILL starts (after at most the expiry), while a second copy of a
  live job is refused within seconds.
- The holder renews the lease every `lease.renew_seconds` from a background thread. When it finds
  the lease taken over by someone else, `lost` becomes true and stays true: the controller stops
  without saving, and `verify()` (called before every checkpoint write) raises.
- Only plain file operations through `tf.io.gfile`: write a temporary file, rename it over the
  lease, read it back. No `flock` (unreliable on NFS), so it works on any filesystem TensorFlow
  can write, buckets included. Two runs starting within the same instant both write; the
  read-back after a short settle lets exactly one of them (the last rename) win.
- Liveness is judged by wall-clock time written by the holder, so hosts sharing a checkpoint
  directory need clocks synchronised to well within `lease.expiry_seconds` (NTP does this).
- What a lease on plain files cannot do (there is no fencing token a filesystem would check): a
  checkpoint write already in flight when the old holder froze may still complete after the
  takeover. It is a complete checkpoint of that holder's step; the new holder, which restored an
  intact one, overwrites that step if it reaches it. No write starts after the check fails.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

import tensorflow as tf

from harness.errors import CheckpointError, LeaseConflictError
from harness.host import process_alive

log = logging.getLogger(__name__)

LEASE_FILE = "LEASE"
# After writing, wait before reading back, so that a rival that read the old lease at the same
# moment has written by then and the read-back shows whose rename came last: twice as long as our
# own write took (a rival's takes about as long), within these bounds. A race that still slips
# through is caught by the renewal thread, which stops the loser before its first checkpoint.
_SETTLE_SECONDS = (0.05, 1.0)


@dataclass(frozen=True)
class LeaseRecord:
    """The content of a lease file."""

    host: str
    pid: int
    token: str  # unique per incarnation: tells our lease from a later one by the same host and pid
    started: float  # unix seconds
    heartbeat: float  # unix seconds of the latest renewal
    # hostname, boot id and pid namespace: equal only where `pid` names the same process table as
    # ours, so "that pid is gone" may be trusted (a hostname alone can be shared by containers)
    machine: str = ""

    def describe(self, now: float) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return (f"host {self.host}, pid {self.pid}, started {started}, "
                f"last renewed {max(now - self.heartbeat, 0.0):.0f} s ago")


class Lease:
    """The lease on one checkpoint directory. Use as a context manager around training."""

    def __init__(self, directory: str, *, expiry_seconds: float, renew_seconds: float) -> None:
        self.directory = directory
        self.path = f"{directory.rstrip('/')}/{LEASE_FILE}"
        self.expiry_seconds = expiry_seconds
        self.renew_seconds = renew_seconds
        now = time.time()
        self.record = LeaseRecord(host=socket.gethostname(), pid=os.getpid(), token=uuid.uuid4().hex,
                                  started=now, heartbeat=now, machine=_machine_identity())
        self.lost_to: LeaseRecord | None = None  # who took the lease over, once noticed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._created_directory = False  # a run that fails before saving leaves no empty checkpoint.dir

    @property
    def lost(self) -> bool:
        return self.lost_to is not None

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    # -- taking and giving back ---------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the lease or raise `LeaseConflictError`; `CheckpointError` if the directory is unwritable."""
        self._stop.clear()
        holder = self._read()
        if holder is not None and holder.token != self.record.token:
            self._wait_out(holder)
        try:
            self._created_directory = not tf.io.gfile.isdir(self.directory)
            tf.io.gfile.makedirs(self.directory)
            writing = time.monotonic()
            self._write()
            write_seconds = time.monotonic() - writing
        except (OSError, tf.errors.OpError) as error:
            raise CheckpointError(
                f"checkpoint.dir '{self.directory}' is not writable ({_reason(error)}): the lease file {self.path} "
                "could not be written, so no checkpoint could be either. Nothing was trained or changed. Check the "
                "path, its permissions and free space, or point checkpoint.dir elsewhere.") from None
        time.sleep(min(max(2 * write_seconds, _SETTLE_SECONDS[0]), _SETTLE_SECONDS[1]))
        winner = self._read()
        if winner is None or winner.token != self.record.token:
            raise LeaseConflictError(
                f"Another run took the lease on checkpoint.dir '{self.directory}' at the same moment "
                f"({winner.describe(time.time()) if winner else 'the lease file vanished'}); this one does not start.")
        self._thread = threading.Thread(target=self._renew_until_stopped, name="harness-lease", daemon=True)
        self._thread.start()

    def _wait_out(self, holder: LeaseRecord) -> None:
        """Return once `holder`'s lease may be taken over; raise if it is renewed meanwhile."""
        first_seen = holder.heartbeat
        while True:
            now = time.time()
            if holder.machine and holder.machine == self.record.machine and not process_alive(holder.pid):
                log.warning("taking over the lease on %s from %s: that process no longer exists", self.directory,
                            holder.describe(now))
                return
            if now - holder.heartbeat >= self.expiry_seconds:
                log.warning("taking over the expired lease on %s from %s", self.directory, holder.describe(now))
                return
            if holder.heartbeat != first_seen:
                raise LeaseConflictError(
                    f"Another run is using checkpoint.dir '{self.directory}': its lease file {self.path} is held by "
                    f"{holder.describe(now)}, and it renewed the lease while this run waited. Two runs must never "
                    f"write the same checkpoints, so this one does not start. Stop the other run first; to train a "
                    "separate run, use another experiment= or checkpoint.dir.")
            wait = min(self.expiry_seconds - (now - holder.heartbeat), self.renew_seconds) + _SETTLE_SECONDS[1]
            log.warning("checkpoint.dir %s is leased by %s; waiting up to %.0f s: a renewal means that run is alive "
                        "(this one then stops), none means it is gone (this one takes over)", self.directory,
                        holder.describe(now), self.expiry_seconds - (now - holder.heartbeat))
            time.sleep(max(wait, 0.0))
            current = self._read()
            if current is None or current.token == self.record.token:
                return  # released meanwhile
            if current.token != holder.token:
                holder, first_seen = current, current.heartbeat  # a third run took it: watch that one
            else:
                holder = current

    def release(self) -> None:
        """Stop renewing and delete the lease file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            current = self._read()
            if current is not None and current.token == self.record.token:
                tf.io.gfile.remove(self.path)
            if self._created_directory and not tf.io.gfile.listdir(self.directory):
                tf.io.gfile.rmtree(self.directory)
        except (OSError, tf.errors.OpError, LeaseConflictError):
            pass  # an expired lease file is harmless: the next run takes it over

    # -- while training -----------------------------------------------------------------------------
    def verify(self) -> None:
        """Raise `LeaseConflictError` unless this process still holds the lease. Call before writing."""
        if self.lost_to is None:
            current = self._read_tolerant()
            if current is not None and current.token != self.record.token:
                self.lost_to = current
        if self.lost_to is not None:
            raise LeaseConflictError(self.lost_message())

    def lost_message(self) -> str:
        taker = self.lost_to.describe(time.time()) if self.lost_to else "another run"
        return (f"This run lost its lease on checkpoint.dir '{self.directory}' to {taker}: it was not renewed for "
                f"lease.expiry_seconds={self.expiry_seconds:g} (the process was frozen or cut off), and a newer run "
                "took over. This run stops without writing anything; the newer run continues from the checkpoints.")

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(self.renew_seconds):
            try:
                current = self._read()
            except (CheckpointError, LeaseConflictError) as error:
                # Not knowing who holds it, writing could undo a takeover: skip this renewal. If
                # reads keep failing, the lease expires and a new run may take over, which is right.
                log.warning("could not read the lease %s (%s); not renewing it this time", self.path, error)
                continue
            if current is not None and current.token != self.record.token:
                self.lost_to = current
                log.error("lease on %s taken over by %s: stopping without writing", self.directory,
                          current.describe(time.time()))
                return
            try:
                self._write()
            except (OSError, tf.errors.OpError) as error:  # a flaky filesystem: try again next period
                log.warning("could not renew the lease %s (%s); retrying in %g s", self.path, _reason(error),
                            self.renew_seconds)

    # -- the file -----------------------------------------------------------------------------------
    def _write(self) -> None:
        self.record = LeaseRecord(**{**asdict(self.record), "heartbeat": time.time()})
        temporary = f"{self.path}.tmp-{self.record.token}"
        try:
            with tf.io.gfile.GFile(temporary, "w") as handle:
                handle.write(json.dumps(asdict(self.record)))
            tf.io.gfile.rename(temporary, self.path, overwrite=True)
        except (OSError, tf.errors.OpError):
            with contextlib.suppress(OSError, tf.errors.OpError):  # no temporary file left behind
                tf.io.gfile.remove(temporary)
            raise

    def _read(self) -> LeaseRecord | None:
        try:
            if not tf.io.gfile.exists(self.path):
                return None
            with tf.io.gfile.GFile(self.path, "r") as handle:
                return _parse(json.loads(handle.read()))
        except tf.errors.NotFoundError:  # removed between exists() and open()
            return None
        except (ValueError, TypeError) as error:
            raise LeaseConflictError(
                f"The lease file {self.path} is not a lease this harness wrote ({error}). If no other run uses "
                f"checkpoint.dir '{self.directory}', delete the file and start again.") from None
        except (OSError, tf.errors.OpError) as error:
            raise CheckpointError(f"The lease file {self.path} cannot be read ({_reason(error)}).") from None

    def _read_tolerant(self) -> LeaseRecord | None:
        """`_read` for the renewal path: a transient read failure is not a takeover."""
        try:
            return self._read()
        except (CheckpointError, LeaseConflictError) as error:
            log.warning("could not read the lease %s: %s", self.path, error)
            return None


def _parse(content: object) -> LeaseRecord:
    """A `LeaseRecord` from parsed JSON; `ValueError` unless it has the fields and types we write."""
    if not isinstance(content, dict):
        raise ValueError(f"expected a JSON object, found {type(content).__name__}")
    record = LeaseRecord(**content)
    numbers_ok = all(isinstance(value, (int, float)) and not isinstance(value, bool)
                     for value in (record.started, record.heartbeat))
    if not (isinstance(record.host, str) and isinstance(record.token, str) and isinstance(record.machine, str)
            and isinstance(record.pid, int) and numbers_ok):
        raise ValueError("a field has the wrong type")
    return record


def _machine_identity() -> str:
    """hostname/boot id/pid-namespace inode: the same only where pids mean the same processes (Linux)."""
    parts = [socket.gethostname()]
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            parts.append(handle.read().strip())
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        return ""  # not Linux: never trust a pid across processes
    return "/".join(parts)


def _reason(error: BaseException) -> str:
    return getattr(error, "message", None) or getattr(error, "strerror", None) or str(error)
