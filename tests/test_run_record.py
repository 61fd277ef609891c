"""harness/operations/run_record.py: restart accounting across attempts, each attempt a fresh RunAccounting on
the same run_dir (as a restarted process has), checked through run_record.json on disk.

An attempt that was killed is one that never called `finish`: the file it leaves is exactly what a
SIGKILLed process leaves, so these tests abandon the object instead of killing a TensorFlow process.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from harness.errors import CrashLoopError, ExitCode
from harness.operations.run_record import RECORD_FILE, RunAccounting, RunRecord, read_record


def accounting(run_dir: Path, *, max_crash_restarts: int = 3, fingerprint: str = "config-a",
               writer: bool = True, may_write=lambda: True) -> RunAccounting:
    return RunAccounting(str(run_dir), writer=writer, max_crash_restarts=max_crash_restarts,
                         fingerprint=fingerprint, may_write=may_write)


def on_disk(run_dir: Path) -> dict:
    return json.loads((run_dir / RECORD_FILE).read_text())


def crashed_attempt(run_dir: Path, *, step: int, outcome: str = "crashed", start_step: int = 20,
                    fingerprint: str = "config-a", max_crash_restarts: int = 3) -> RunAccounting:
    """One attempt the way attempt.py drives it: refuse a crash loop, begin, crash at `step`."""
    attempt = accounting(run_dir, max_crash_restarts=max_crash_restarts, fingerprint=fingerprint)
    attempt.refuse_crash_loop()
    attempt.begin(start_step=start_step, process_started=time.time())
    attempt.progress(step)
    attempt.finish(outcome, step=step)
    return attempt


def test_first_attempt_is_marked_in_progress_on_disk(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"  # created by the first write
    before = time.time()
    accounting(run_dir).begin(start_step=0, process_started=before)
    record = on_disk(run_dir)
    assert (record["attempts"], record["restarts"], record["kills"], record["crashes"]) == (1, 0, 0, 0)
    current = record["current"]
    assert (current["host"], current["pid"], current["start_step"], current["step"]) == (
        socket.gethostname(), os.getpid(), 0, 0)
    assert before <= current["started"] <= time.time()
    assert record["history"] == []
    assert [name for name in os.listdir(run_dir)] == [RECORD_FILE]  # no temporary file left behind


def test_progress_and_finish_are_written_as_they_happen(tmp_path: Path) -> None:
    attempt = accounting(tmp_path)
    attempt.begin(start_step=0, process_started=time.time())
    attempt.progress(10, seconds_per_step=0.25)
    assert (on_disk(tmp_path)["current"]["step"], on_disk(tmp_path)["current"]["seconds_per_step"]) == (10, 0.25)
    attempt.progress(20)  # no new timing: the last one is kept
    assert (on_disk(tmp_path)["current"]["step"], on_disk(tmp_path)["current"]["seconds_per_step"]) == (20, 0.25)
    attempt.finish("completed", step=60)
    record = on_disk(tmp_path)
    assert record["current"] is None
    assert [(entry["outcome"], entry["start_step"], entry["end_step"]) for entry in record["history"]] == [
        ("completed", 0, 60)]
    assert record["history"][0]["ended"] >= record["history"][0]["started"]


def test_a_resume_after_preemption_counts_the_restart_and_the_steps_redone(tmp_path: Path) -> None:
    first = accounting(tmp_path)
    first.begin(start_step=0, process_started=time.time())
    first.progress(50, seconds_per_step=0.5)
    first.finish("preempted", step=50)
    # The preemption checkpoint was lost: the next attempt resumes from step 40, 3 s after it started.
    second = accounting(tmp_path)
    second.begin(start_step=40, process_started=time.time() - 3.0)
    record = on_disk(tmp_path)
    assert (record["attempts"], record["restarts"], record["preemptions"], record["kills"]) == (2, 1, 1, 0)
    assert record["steps_redone"] == 10
    assert 10 * 0.5 + 3.0 <= record["wall_time_lost_seconds"] < 10 * 0.5 + 3.0 + 1.0
    assert record["current"]["start_step"] == 40


def test_an_attempt_that_vanished_is_counted_as_a_kill_at_the_next_begin(tmp_path: Path) -> None:
    killed = accounting(tmp_path)
    killed.begin(start_step=0, process_started=time.time())
    killed.progress(30, seconds_per_step=0.1)
    del killed  # SIGKILL: no finish, the record still says "in progress"
    assert on_disk(tmp_path)["current"]["step"] == 30
    restarted = accounting(tmp_path)
    restarted.begin(start_step=20, process_started=time.time())
    record = on_disk(tmp_path)
    assert (record["kills"], record["crashes"], record["restarts"], record["attempts"]) == (1, 0, 1, 2)
    assert record["consecutive_crashes"] == 0  # a scheduler's kill is not a bug
    assert [(entry["outcome"], entry["end_step"]) for entry in record["history"]] == [("killed", 30)]
    assert record["steps_redone"] == 10
    assert record["wall_time_lost_seconds"] >= 10 * 0.1


@pytest.mark.parametrize("outcome", ["completed", "already_complete"])
def test_starting_again_after_a_complete_run_is_not_a_restart(tmp_path: Path, outcome: str) -> None:
    first = accounting(tmp_path)
    first.begin(start_step=0, process_started=time.time() - 5.0)
    first.finish(outcome, step=60)
    accounting(tmp_path).begin(start_step=60, process_started=time.time() - 5.0)
    record = on_disk(tmp_path)
    assert (record["attempts"], record["restarts"], record["steps_redone"], record["wall_time_lost_seconds"]) == (
        2, 0, 0, 0.0)


@pytest.mark.parametrize("outcome", ["crashed", "hung", "stalled"])
def test_max_crash_restarts_crashes_at_the_same_step_refuse_the_next_start(tmp_path: Path, outcome: str) -> None:
    crashed_attempt(tmp_path, step=25, outcome=outcome)
    crashed_attempt(tmp_path, step=25, outcome=outcome)
    accounting(tmp_path).refuse_crash_loop()  # two in a row: still allowed
    crashed_attempt(tmp_path, step=25, outcome=outcome)
    record = on_disk(tmp_path)
    assert (record["crashes"], record["consecutive_crashes"], record["crash_step"]) == (3, 3, 25)
    with pytest.raises(CrashLoopError) as refused:
        accounting(tmp_path).refuse_crash_loop()
    message = str(refused.value)
    assert "The last 3 attempts of this run all crashed at step 25" in message
    assert "trainer.max_crash_restarts=3" in message
    assert str(tmp_path / RECORD_FILE) in message
    assert refused.value.exit_code == ExitCode.CRASH_LOOP == 7


def test_crashes_at_different_steps_are_not_a_loop(tmp_path: Path) -> None:
    for step in (25, 26, 27, 28):
        crashed_attempt(tmp_path, step=step)
    record = on_disk(tmp_path)
    assert (record["crashes"], record["consecutive_crashes"], record["crash_step"]) == (4, 1, 28)
    accounting(tmp_path).refuse_crash_loop()


def test_a_preemption_between_crashes_breaks_the_streak(tmp_path: Path) -> None:
    crashed_attempt(tmp_path, step=25)
    crashed_attempt(tmp_path, step=25)
    preempted = accounting(tmp_path)
    preempted.begin(start_step=20, process_started=time.time())
    preempted.finish("preempted", step=25)
    assert (on_disk(tmp_path)["consecutive_crashes"], on_disk(tmp_path)["crash_step"]) == (0, None)
    crashed_attempt(tmp_path, step=25)
    record = on_disk(tmp_path)
    assert (record["crashes"], record["preemptions"], record["consecutive_crashes"]) == (3, 1, 1)
    accounting(tmp_path).refuse_crash_loop()


def test_kills_do_not_count_towards_a_crash_loop(tmp_path: Path) -> None:
    crashed_attempt(tmp_path, step=25, max_crash_restarts=2)
    killed = accounting(tmp_path, max_crash_restarts=2)
    killed.begin(start_step=20, process_started=time.time())
    killed.progress(25)  # then SIGKILL at the crash step
    restarted = accounting(tmp_path, max_crash_restarts=2)
    restarted.refuse_crash_loop()
    restarted.begin(start_step=20, process_started=time.time())
    record = on_disk(tmp_path)
    assert (record["crashes"], record["kills"], record["consecutive_crashes"]) == (1, 1, 1)


def test_a_changed_fingerprint_resets_the_crash_count(tmp_path: Path, caplog) -> None:
    for _ in range(3):
        crashed_attempt(tmp_path, step=25, fingerprint="config-a")
    with pytest.raises(CrashLoopError):
        accounting(tmp_path, fingerprint="config-a").refuse_crash_loop()
    fixed = accounting(tmp_path, fingerprint="config-b")
    fixed.refuse_crash_loop()  # the user changed something: try again
    assert "trying again" in caplog.text
    fixed.begin(start_step=20, process_started=time.time())
    assert on_disk(tmp_path)["consecutive_crashes"] == 0
    fixed.finish("crashed", step=25)  # same step, new config: a new streak of one
    record = on_disk(tmp_path)
    assert (record["consecutive_crashes"], record["crash_fingerprint"], record["crashes"]) == (1, "config-b", 4)


def test_zero_max_crash_restarts_never_refuses(tmp_path: Path) -> None:
    for _ in range(5):
        crashed_attempt(tmp_path, step=25, max_crash_restarts=0)
    assert on_disk(tmp_path)["consecutive_crashes"] == 5
    accounting(tmp_path, max_crash_restarts=0).refuse_crash_loop()


def test_a_non_writer_reads_the_record_but_never_writes(tmp_path: Path) -> None:
    worker = accounting(tmp_path, writer=False)
    worker.begin(start_step=0, process_started=time.time())
    worker.progress(10)
    worker.rollback()
    worker.finish("crashed", step=10)
    assert not (tmp_path / RECORD_FILE).exists()
    assert (worker.record.attempts, worker.record.crashes, worker.record.rollbacks) == (1, 1, 1)  # kept in memory
    chief = accounting(tmp_path)
    chief.begin(start_step=0, process_started=time.time())
    chief.progress(30)
    assert accounting(tmp_path, writer=False).record.current["step"] == 30


def test_no_write_once_may_write_turns_false(tmp_path: Path) -> None:
    holds_lease = [True]
    attempt = accounting(tmp_path, may_write=lambda: holds_lease[0])
    attempt.begin(start_step=0, process_started=time.time())
    written = (tmp_path / RECORD_FILE).read_text()
    holds_lease[0] = False  # the lease was lost: the record is the new holder's
    attempt.progress(30)
    attempt.rollback()
    attempt.finish("crashed", step=30)
    assert (tmp_path / RECORD_FILE).read_text() == written
    assert attempt.record.crashes == 1


def test_read_record_ignores_a_missing_or_unreadable_file(tmp_path: Path, caplog) -> None:
    assert read_record(str(tmp_path)) is None
    path = tmp_path / RECORD_FILE
    attempt = accounting(tmp_path)
    attempt.begin(start_step=0, process_started=time.time())
    valid = path.read_text()
    for garbage in (valid[: len(valid) // 2].encode(), b"", b"\xff\xfe\x00garbage", b"{not json"):
        path.write_bytes(garbage)
        assert read_record(str(tmp_path)) is None, garbage
    assert "ignoring the unreadable run record" in caplog.text
    # A fresh accounting over garbage starts a new record (it is advisory) and replaces the file.
    accounting(tmp_path).begin(start_step=0, process_started=time.time())
    assert on_disk(tmp_path)["attempts"] == 1


def test_read_record_ignores_fields_it_does_not_know(tmp_path: Path) -> None:
    (tmp_path / RECORD_FILE).write_text(json.dumps({"attempts": 4, "kills": 2, "written_by_a_newer_harness": 1}))
    record = read_record(str(tmp_path))
    assert record == RunRecord(attempts=4, kills=2)


def test_history_keeps_the_latest_twenty_attempts(tmp_path: Path) -> None:
    for index in range(25):
        attempt = accounting(tmp_path)
        attempt.begin(start_step=index * 10, process_started=time.time())
        attempt.finish("preempted", step=index * 10 + 10)
    record = on_disk(tmp_path)
    assert (record["attempts"], record["preemptions"], record["restarts"]) == (25, 25, 24)
    assert [entry["start_step"] for entry in record["history"]] == [index * 10 for index in range(5, 25)]


def test_rollbacks_and_the_summary_scalars(tmp_path: Path) -> None:
    attempt = accounting(tmp_path)
    attempt.begin(start_step=0, process_started=time.time())
    attempt.rollback()
    attempt.rollback()
    assert on_disk(tmp_path)["rollbacks"] == 2
    record = read_record(str(tmp_path))
    assert record.scalars() == {"run/restarts": 0.0, "run/preemptions": 0.0, "run/crashes": 0.0, "run/kills": 0.0,
                                "run/rollbacks": 2.0, "run/steps_redone": 0.0, "run/wall_time_lost_seconds": 0.0}
    assert record.summary() == ("attempt 1: 0 restarts (0 preemptions, 0 kills, 0 crashes), 2 rollbacks, "
                                "0 steps redone, 0 s lost")


def test_finish_without_begin_records_nothing(tmp_path: Path) -> None:
    attempt = accounting(tmp_path)
    attempt.finish("crashed", step=5)
    attempt.progress(5)
    assert not (tmp_path / RECORD_FILE).exists()
    assert (attempt.record.crashes, attempt.record.consecutive_crashes) == (0, 0)
