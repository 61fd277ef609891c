"""scripts/tooling/chaos.py's bookkeeping: what counts as a kill, and where the reference run writes."""

from __future__ import annotations

import pytest

from scripts.tooling.chaos import Attempt, ChaosReport, reference_command


def attempt(exit_code: int, signal_sent: str | None) -> Attempt:
    return Attempt(exit_code=exit_code, signal_sent=signal_sent, resumed_from=0, last_step_seen=10, stopped_at=None,
                   output="")


def test_a_signal_that_lands_after_the_run_finished_is_not_a_kill() -> None:
    report = ChaosReport([attempt(-9, "SIGKILL"), attempt(42, "SIGTERM"), attempt(0, "SIGTERM")])
    assert report.kills == 2 and report.completed


def test_the_reference_run_writes_neither_the_run_dir_nor_the_checkpoint_dir_of_the_run() -> None:
    command = ["python", "train.py", "run_dir=/r/a", "checkpoint.dir=/shared/ckpt", "seed=1"]
    assert reference_command(command) == ["python", "train.py", "run_dir=/r/a-reference",
                                          "checkpoint.dir=/shared/ckpt-reference", "seed=1"]
    with pytest.raises(ValueError, match="run_dir"):
        reference_command(["python", "train.py", "seed=1"])
