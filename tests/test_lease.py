"""harness/operations/lease.py for real: lease files in tmp_path, a second Lease renewing from its own thread, a
holder on another host written by hand, and a holder process that really died. Short real timings
(renew every 0.2 s, expiry after 1 s) keep each test to a second or two."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import tensorflow as tf

from harness.errors import CheckpointError, ExitCode, LeaseConflictError
from harness.operations.lease import LEASE_FILE, Lease, _machine_identity

RENEW_SECONDS = 0.2
EXPIRY_SECONDS = 1.0
RECORD_KEYS = {"host", "pid", "token", "started", "heartbeat", "machine"}


def fast_lease(directory: Path, *, expiry_seconds: float = EXPIRY_SECONDS,
               renew_seconds: float = RENEW_SECONDS) -> Lease:
    return Lease(str(directory), expiry_seconds=expiry_seconds, renew_seconds=renew_seconds)


def read_lease(directory: Path) -> dict:
    return json.loads((directory / LEASE_FILE).read_text())


def write_lease(directory: Path, *, host: str, pid: int, heartbeat: float, token: str, machine: str = "") -> None:
    """A lease written by another incarnation, atomically (as a real holder does: no half-written file)."""
    directory.mkdir(parents=True, exist_ok=True)
    temporary = directory / f"{LEASE_FILE}.tmp-test"
    temporary.write_text(json.dumps({"host": host, "pid": pid, "token": token, "started": heartbeat - 60,
                                     "heartbeat": heartbeat, "machine": machine}))
    os.replace(temporary, directory / LEASE_FILE)


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_acquire_writes_a_lease_renews_it_and_release_removes_it(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"  # does not exist yet: acquire creates it
    lease = fast_lease(directory)
    lease.acquire()
    try:
        first = read_lease(directory)
        assert set(first) == RECORD_KEYS
        assert (first["host"], first["pid"], first["token"]) == (socket.gethostname(), os.getpid(), lease.record.token)
        time.sleep(2.5 * RENEW_SECONDS)
        renewed = read_lease(directory)
        assert renewed["heartbeat"] > first["heartbeat"]
        assert (renewed["token"], renewed["started"]) == (first["token"], first["started"])
        lease.verify()  # still ours: no exception
        assert not lease.lost
    finally:
        lease.release()
    # The lease and every temporary file are gone, and so is the directory acquire created: a run that
    # stops before its first checkpoint leaves no trace.
    assert not directory.exists()


def test_release_keeps_a_directory_it_did_not_create_or_that_holds_checkpoints(tmp_path: Path) -> None:
    existing = tmp_path / "existing"
    existing.mkdir()
    with fast_lease(existing):
        pass
    assert existing.is_dir()
    created = tmp_path / "created"
    with fast_lease(created):
        (created / "ckpt-1.index").write_text("saved meanwhile")
    assert (created / "ckpt-1.index").exists() and not (created / LEASE_FILE).exists()


def test_context_manager_releases_the_lease_when_training_raises(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="training failed"), fast_lease(tmp_path) as lease:
        assert read_lease(tmp_path)["token"] == lease.record.token
        raise RuntimeError("training failed")
    assert not (tmp_path / LEASE_FILE).exists()


def test_a_live_holder_is_refused_within_seconds_and_keeps_its_lease(tmp_path: Path) -> None:
    # Expiry well above the refusal time: a rival that failed to notice the renewals would take over
    # after 3 s, so finishing sooner with an error shows the renewal was seen.
    holder = fast_lease(tmp_path, expiry_seconds=3.0)
    holder.acquire()
    try:
        rival = fast_lease(tmp_path, expiry_seconds=3.0)
        started = time.monotonic()
        with pytest.raises(LeaseConflictError) as refused:
            rival.acquire()
        assert time.monotonic() - started < 2.0
        message = str(refused.value)
        assert f"host {socket.gethostname()}, pid {os.getpid()}" in message
        assert "renewed the lease while this run waited" in message
        assert str(tmp_path / LEASE_FILE) in message
        assert refused.value.exit_code == ExitCode.LEASE_CONFLICT
        assert read_lease(tmp_path)["token"] == holder.record.token
        holder.verify()
        assert not holder.lost
    finally:
        holder.release()


def test_a_silent_holder_on_another_host_is_waited_out_then_taken_over(tmp_path: Path, caplog) -> None:
    last_renewed = time.time() - 0.5  # half expired already
    write_lease(tmp_path, host="other-host", pid=4242, heartbeat=last_renewed, token="silent")
    lease = fast_lease(tmp_path)
    with caplog.at_level(logging.WARNING, logger="harness.operations.lease"):
        lease.acquire()
    try:
        assert time.time() - last_renewed >= EXPIRY_SECONDS  # waited the expiry out
        assert time.time() - last_renewed < EXPIRY_SECONDS + 1.5
        assert read_lease(tmp_path)["token"] == lease.record.token
        assert "taking over the expired lease" in caplog.text
        assert "host other-host, pid 4242" in caplog.text
    finally:
        lease.release()


def test_a_lease_expired_long_ago_is_taken_over_at_once(tmp_path: Path) -> None:
    write_lease(tmp_path, host="other-host", pid=4242, heartbeat=time.time() - 3600, token="stale")
    lease = fast_lease(tmp_path, expiry_seconds=30.0)
    started = time.monotonic()
    lease.acquire()
    try:
        assert time.monotonic() - started < 1.2  # the read-back settle only, no waiting
        assert read_lease(tmp_path)["token"] == lease.record.token
    finally:
        lease.release()


def test_a_holder_on_this_host_whose_process_died_is_taken_over_at_once(tmp_path: Path, caplog) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    write_lease(tmp_path, host=socket.gethostname(), pid=holder.pid, heartbeat=time.time(), token="killed",
                machine=_machine_identity())
    holder.kill()
    holder.wait(timeout=10)
    # A fresh heartbeat and a 30 s expiry: only the dead process lets the lease go early.
    lease = fast_lease(tmp_path, expiry_seconds=30.0)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="harness.operations.lease"):
        lease.acquire()
    try:
        assert time.monotonic() - started < 1.5
        assert read_lease(tmp_path)["token"] == lease.record.token
        assert "that process no longer exists" in caplog.text
        assert f"pid {holder.pid}" in caplog.text
    finally:
        lease.release()


def test_a_dead_pid_under_the_same_hostname_on_another_machine_is_not_trusted(tmp_path: Path) -> None:
    """Containers can share a hostname; their pids are not ours to check: wait for the expiry instead."""
    holder = subprocess.Popen([sys.executable, "-c", "pass"])
    holder.wait(timeout=10)
    write_lease(tmp_path, host=socket.gethostname(), pid=holder.pid, heartbeat=time.time(), token="elsewhere",
                machine=f"{socket.gethostname()}/another-boot/4026531836")
    lease = fast_lease(tmp_path, expiry_seconds=1.5, renew_seconds=0.5)
    started = time.monotonic()
    lease.acquire()
    try:
        assert time.monotonic() - started >= 1.2, "took over before the expiry on a pid it cannot check"
        assert read_lease(tmp_path)["token"] == lease.record.token
    finally:
        lease.release()


def test_a_lease_released_while_waiting_is_taken_before_expiry(tmp_path: Path) -> None:
    write_lease(tmp_path, host="other-host", pid=4242, heartbeat=time.time(), token="leaving")
    remover = threading.Timer(0.3, (tmp_path / LEASE_FILE).unlink)
    remover.start()
    lease = fast_lease(tmp_path, expiry_seconds=10.0)
    started = time.monotonic()
    try:
        lease.acquire()
        assert time.monotonic() - started < 2.5
        assert read_lease(tmp_path)["token"] == lease.record.token
    finally:
        remover.join()
        lease.release()


def test_a_third_run_taking_over_while_waiting_is_watched_in_turn_not_refused(tmp_path: Path) -> None:
    write_lease(tmp_path, host="other-host", pid=1111, heartbeat=time.time(), token="first")
    taken_at: list[float] = []

    def third_run_takes_over() -> None:
        taken_at.append(time.time() - 0.5)  # renewed half an expiry ago, then silent
        write_lease(tmp_path, host="third-host", pid=2222, heartbeat=taken_at[0], token="third")

    takeover = threading.Timer(0.3, third_run_takes_over)
    takeover.start()
    lease = fast_lease(tmp_path)
    try:
        lease.acquire()  # a new token is a different holder, not a renewal: it is waited out too
        acquired_at = time.time()
        assert acquired_at - taken_at[0] >= EXPIRY_SECONDS  # the third run's lease expired first
        assert read_lease(tmp_path)["token"] == lease.record.token
    finally:
        takeover.join()
        lease.release()


def test_a_takeover_is_noticed_by_renewal_and_the_new_holder_is_left_alone(tmp_path: Path) -> None:
    lease = fast_lease(tmp_path)
    lease.acquire()
    try:
        write_lease(tmp_path, host="other-host", pid=4242, heartbeat=time.time(), token="newer")
        assert wait_until(lambda: lease.lost, timeout=3 * RENEW_SECONDS + 0.5)
        assert (lease.lost_to.host, lease.lost_to.pid, lease.lost_to.token) == ("other-host", 4242, "newer")
        with pytest.raises(LeaseConflictError, match="lost its lease") as lost:
            lease.verify()
        assert "host other-host, pid 4242" in str(lost.value)
        time.sleep(1.5 * RENEW_SECONDS)  # the old holder stopped renewing: it must not write over the new lease
        assert read_lease(tmp_path)["token"] == "newer"
    finally:
        lease.release()
    assert read_lease(tmp_path)["token"] == "newer"  # release deletes only its own lease
    assert lease.lost  # stays true


def test_verify_sees_a_takeover_before_the_next_renewal(tmp_path: Path) -> None:
    lease = fast_lease(tmp_path, expiry_seconds=120.0, renew_seconds=60.0)  # the renewal thread stays asleep
    lease.acquire()
    try:
        lease.verify()
        write_lease(tmp_path, host="other-host", pid=4242, heartbeat=time.time(), token="newer")
        with pytest.raises(LeaseConflictError, match="other-host"):
            lease.verify()
        assert lease.lost_to is not None and lease.lost_to.token == "newer"
    finally:
        lease.release()


def test_an_unwritable_directory_is_a_checkpoint_error_naming_it(tmp_path: Path) -> None:
    # A regular file where a directory should be: unwritable for root too (tests may run as root).
    (tmp_path / "not_a_directory").write_text("x")
    directory = tmp_path / "not_a_directory" / "checkpoints"
    with pytest.raises(CheckpointError) as unwritable:
        fast_lease(directory).acquire()
    message = str(unwritable.value)
    assert f"checkpoint.dir '{directory}' is not writable" in message
    assert str(directory / LEASE_FILE) in message
    assert unwritable.value.exit_code == ExitCode.USER_ERROR
    assert (tmp_path / "not_a_directory").read_text() == "x"


@pytest.mark.parametrize("content", ["{not json", '{"host": "h", "pid": 1}', "[1, 2]"],
                         ids=["not-json", "missing-fields", "not-an-object"])
def test_a_garbled_lease_file_is_a_conflict_and_is_left_untouched(tmp_path: Path, content: str) -> None:
    (tmp_path / LEASE_FILE).write_text(content)
    with pytest.raises(LeaseConflictError) as garbled:
        fast_lease(tmp_path).acquire()
    message = str(garbled.value)
    assert f"The lease file {tmp_path / LEASE_FILE} is not a lease this harness wrote" in message
    assert "delete the file and start again" in message
    assert (tmp_path / LEASE_FILE).read_text() == content
    assert sorted(os.listdir(tmp_path)) == [LEASE_FILE]


def test_a_failed_lease_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    """The rename over LEASE fails (here: a directory holds its name); the written temporary goes."""
    (tmp_path / LEASE_FILE).mkdir()
    (tmp_path / LEASE_FILE / "occupied").write_text("x")
    with pytest.raises((OSError, tf.errors.OpError)):
        fast_lease(tmp_path)._write()
    assert sorted(path.name for path in tmp_path.iterdir()) == [LEASE_FILE]
