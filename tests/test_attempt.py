"""harness/operations/attempt.py: what an attempt records when it ends before training began.

A start refused with a `HarnessError` (a mismatched checkpoint, a refused config change) must leave
`run_record.json` byte for byte as it was, even when the previous attempt was killed and so is
still marked in progress; a crash while restoring is an attempt that crashed.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from harness.config.run_config import to_typed_config
from harness.errors import CheckpointError
from harness.operations.attempt import Attempt
from harness.operations.run_record import RECORD_FILE, RunAccounting
from tests.conftest import compose


def killed_attempt_on_disk(run_dir: Path) -> bytes:
    """The record a SIGKILLed attempt leaves: begun at step 20, never finished."""
    killed = RunAccounting(str(run_dir), writer=True, max_crash_restarts=3, fingerprint="f")
    killed.begin(start_step=20, process_started=time.time())
    return (run_dir / RECORD_FILE).read_bytes()


def attempt(run_dir: Path) -> Attempt:
    run = to_typed_config(compose(f"run_dir={run_dir}"))
    return Attempt(run, is_chief=True, process_started=time.time())


@pytest.mark.parametrize("refusal", [CheckpointError("checkpoint ckpt-20 does not match the model"),
                                     KeyboardInterrupt()], ids=["refused", "ctrl_c"])
def test_a_start_refused_or_interrupted_before_training_leaves_the_run_record_as_it_was(
        tmp_path: Path, refusal: BaseException) -> None:
    before = killed_attempt_on_disk(tmp_path)
    with pytest.raises(type(refusal)), attempt(tmp_path):
        raise refusal
    assert (tmp_path / RECORD_FILE).read_bytes() == before
    assert not (tmp_path / "checkpoints" / "LEASE").exists(), "the lease is given back"


def test_a_crash_while_restoring_counts_as_a_crashed_attempt(tmp_path: Path) -> None:
    killed_attempt_on_disk(tmp_path)
    with pytest.raises(RuntimeError), attempt(tmp_path):
        raise RuntimeError("a bug in a restore hook")
    record = json.loads((tmp_path / RECORD_FILE).read_text())
    assert [item["outcome"] for item in record["history"]] == ["killed", "crashed"]
    assert (record["kills"], record["crashes"], record["consecutive_crashes"]) == (1, 1, 1)
    assert record["current"] is None


def test_a_crash_while_restoring_after_a_preemption_redoes_no_steps(tmp_path: Path) -> None:
    """Where it would have resumed is unknown: the previous attempt's last step, not step 0 (4000 steps 'redone')."""
    preempted = RunAccounting(str(tmp_path), writer=True, max_crash_restarts=3, fingerprint="f")
    preempted.begin(start_step=0, process_started=time.time())
    preempted.progress(4000, seconds_per_step=0.5)
    preempted.finish("preempted", step=4000)
    with pytest.raises(RuntimeError), attempt(tmp_path):
        raise RuntimeError("a bug in a restore hook")
    record = json.loads((tmp_path / RECORD_FILE).read_text())
    assert [(item["outcome"], item["start_step"], item["end_step"]) for item in record["history"]] == [
        ("preempted", 0, 4000), ("crashed", 4000, 4000)]
    assert record["steps_redone"] == 0 and record["wall_time_lost_seconds"] < 60


def test_ctrl_c_after_training_began_is_not_a_crash(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), attempt(tmp_path) as interrupted:
        interrupted.begin(0)
        interrupted.step = 30
        raise KeyboardInterrupt
    record = json.loads((tmp_path / RECORD_FILE).read_text())
    assert [(item["outcome"], item["end_step"]) for item in record["history"]] == [("interrupted", 30)]
    assert (record["crashes"], record["consecutive_crashes"]) == (0, 0)


def test_the_record_is_read_again_once_the_lease_is_ours(tmp_path: Path) -> None:
    """The previous holder, still alive when this attempt was created, records its crash and releases the
    lease while this one waits for it: this attempt must build on that record, not on what it read before."""
    run = to_typed_config(compose(f"run_dir={tmp_path}", "lease.renew_seconds=1", "lease.expiry_seconds=10",
                                  "trainer.max_crash_restarts=0"))
    previous = Attempt(run, is_chief=True, process_started=time.time())
    previous.__enter__()
    previous.begin(100)
    previous.step = 150
    waiting = Attempt(run, is_chief=True, process_started=time.time())  # reads the record now: in progress

    def crash_then_release() -> None:
        time.sleep(1.0)
        previous.__exit__(RuntimeError, RuntimeError("boom"), None)

    crashing = threading.Thread(target=crash_then_release)
    crashing.start()
    with waiting:
        waiting.begin(150)
        waiting.finish("completed", step=200)
    crashing.join()
    record = json.loads((tmp_path / RECORD_FILE).read_text())
    assert [item["outcome"] for item in record["history"]] == ["crashed", "completed"]
    assert (record["crashes"], record["kills"]) == (1, 0)
