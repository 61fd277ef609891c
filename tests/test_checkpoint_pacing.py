"""Checkpoint pacing (harness/checkpoint/pacing.py): by steps, by wall time, within an overhead budget.

The pacer runs on an injected clock, so these tests decide what time it is: no timing assertions.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import pytest

from harness.checkpoint.pacing import SavePacer
from harness.errors import ConfigError
from tests.conftest import assert_ok, compose, run_train


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def train(pacer: SavePacer, clock: FakeClock, *, until: int, seconds_per_step: float, save_seconds: float,
          start: int = 0, steps_per_loop: int = 10) -> list[int]:
    """Drive the pacer as the controller does (inner loops to `next_due_step`); the steps saved at."""
    saves, step = [], start
    while step < until:
        next_step = min(pacer.next_due_step(step), until, step + steps_per_loop)
        clock.now += (next_step - step) * seconds_per_step
        step = next_step
        if pacer.due(step):
            started = clock.now
            clock.now += save_seconds
            pacer.saved(step, blocked_seconds=save_seconds, started=started)
            saves.append(step)
    return saves


def test_by_steps_saves_at_every_multiple() -> None:
    clock = FakeClock()
    pacer = SavePacer(every_steps=20, clock=clock)
    assert train(pacer, clock, until=100, seconds_per_step=1.0, save_seconds=50.0) == [20, 40, 60, 80, 100]
    assert not pacer.depends_on_clock


def test_resumed_off_a_multiple_saves_at_the_next_multiple() -> None:
    clock = FakeClock()
    pacer = SavePacer(every_steps=20, start_step=37, clock=clock)
    assert train(pacer, clock, until=80, seconds_per_step=1.0, save_seconds=0.1, start=37) == [40, 60, 80]


def test_every_seconds_saves_between_step_multiples() -> None:
    clock = FakeClock()
    pacer = SavePacer(every_steps=1000, every_seconds=30.0, clock=clock)
    saves = train(pacer, clock, until=100, seconds_per_step=1.0, save_seconds=0.5)
    assert saves and all(step % 1000 for step in saves)  # by time alone
    gaps = [b - a for a, b in zip([0, *saves], saves)]
    assert all(25 <= gap <= 35 for gap in gaps), gaps  # ~30 s of 1-s steps apart (estimate, then `due`)


def test_max_overhead_stretches_the_interval_and_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    pacer = SavePacer(every_steps=10, max_overhead=0.05, clock=clock)
    with caplog.at_level(logging.INFO, logger="harness.checkpoint.pacing"):
        saves = train(pacer, clock, until=1000, seconds_per_step=1.0, save_seconds=2.0)
    # A 2-s save within 5 % needs >= 40 s of training between saves: every 40 steps once measured.
    assert saves[0] == 10 and pacer.interval_steps == 40
    assert all(step % 10 == 0 for step in saves) and all(b - a == 40 for a, b in itertools.pairwise(saves[1:]))
    assert "checkpoint interval now every 40 steps" in caplog.text and "max_overhead=0.05" in caplog.text
    assert sum(2.0 for _ in saves[1:]) / (1000 - saves[0]) <= 0.05 + 1e-9


def test_max_overhead_shrinks_back_when_saves_get_cheap() -> None:
    clock = FakeClock()
    pacer = SavePacer(every_steps=10, every_seconds=20.0, max_overhead=0.05, clock=clock)
    train(pacer, clock, until=300, seconds_per_step=1.0, save_seconds=4.0)
    assert pacer.interval_steps == 80 and pacer.interval_seconds == 80.0
    train(pacer, clock, until=1000, seconds_per_step=1.0, save_seconds=0.1, start=300)
    assert pacer.interval_steps == 10 and pacer.interval_seconds == 20.0


def test_a_rollback_replays_saves_from_the_restored_step() -> None:
    clock = FakeClock()
    pacer = SavePacer(every_steps=20, clock=clock)
    assert train(pacer, clock, until=60, seconds_per_step=1.0, save_seconds=0.1) == [20, 40, 60]
    assert train(pacer, clock, until=60, seconds_per_step=1.0, save_seconds=0.1, start=20) == [40, 60]


@pytest.mark.parametrize(("override", "key"), [("checkpoint.every_seconds=0", "checkpoint.every_seconds"),
                                               ("checkpoint.max_overhead=1.5", "checkpoint.max_overhead"),
                                               ("checkpoint.max_overhead=0", "checkpoint.max_overhead")])
def test_bad_pacing_settings_are_refused(override: str, key: str) -> None:
    from harness.config.run_config import to_typed_config

    with pytest.raises(ConfigError, match=key):
        to_typed_config(compose(override))


def test_train_py_saves_by_time_at_inner_loop_ends(run_dir: Path) -> None:
    """every_seconds tiny: due after the first inner loop, then (the step time measured) after every step."""
    result = run_train(run_dir, "checkpoint.every_steps=1000", "checkpoint.every_seconds=1e-6",
                       "checkpoint.max_to_keep=100", "trainer.max_steps=30")
    assert_ok(result)
    saved = sorted(int(p.name[len("ckpt-"):-len(".index")]) for p in (run_dir / "checkpoints").glob("ckpt-*.index"))
    assert saved == list(range(10, 31))


def test_with_several_workers_inner_loops_end_at_steps_that_do_not_depend_on_the_clock() -> None:
    clock = FakeClock()
    pacer = SavePacer(every_steps=100, every_seconds=5.0, clock=clock)
    train(pacer, clock, until=60, seconds_per_step=1.0, save_seconds=0.5)  # step time measured locally
    assert pacer.next_due_step(60) < 100  # one process alone ends its loop where its clock says
    assert pacer.next_due_step(60, use_local_clock=False) == 100


@pytest.mark.slow
def test_two_workers_save_by_time_at_the_same_steps(tmp_path: Path) -> None:
    """Time-paced saves on a 2-process MultiWorkerMirroredStrategy gang: inner loops whose length
    depended on each worker's clock used to deadlock the collectives (exit 4). (`max_overhead` under
    the gang: tests/test_distributed.py, the chief's pacer decides.)"""
    from tests.test_distributed import run_gang, worker_lines

    run_dir = tmp_path / "run"
    code, output = run_gang(run_dir, "trainer.max_steps=100", "trainer.log_every=50", "trainer.eval_every=0",
                            "checkpoint.every_steps=1000", "checkpoint.every_seconds=1e-6",
                            "checkpoint.max_to_keep=100", tmpdir=tmp_path / "tmp")
    assert code == 0, output[-4000:]
    saved = [[line.split("saved checkpoint ")[1].split()[0] for line in worker_lines(output, index)
              if "saved checkpoint" in line] for index in (0, 1)]
    assert saved[0] == saved[1] and len(saved[0]) == 10, saved  # every inner loop (10 steps), both workers
    assert sorted(int(p.name[5:-6]) for p in (run_dir / "checkpoints").glob("ckpt-*.index")) == \
        list(range(10, 101, 10))
