"""harness/operations/attempt.py: what an attempt records when it ends before training began.

A start refused with a `HarnessError` (a mismatched checkpoint, a refused config change) must leave
`run_record.json` byte for byte as it was, even when the previous attempt was killed and so is
still marked in progress; a crash while restoring is an attempt that crashed.
"""

from __future__ import annotations

import json
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


def test_a_start_refused_before_training_leaves_the_run_record_as_it_was(tmp_path: Path) -> None:
    before = killed_attempt_on_disk(tmp_path)
    with pytest.raises(CheckpointError), attempt(tmp_path):
        raise CheckpointError("checkpoint ckpt-20 does not match the model")
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
