"""harness/training/divergence.py: which step diverged, and the rollback plan as a pure function of it."""

from __future__ import annotations

import math

import pytest

from harness.training.divergence import Divergence, first_divergence, plan_rollback


@pytest.mark.parametrize(("bad_loss", "reason"), [(math.nan, "NaN"), (math.inf, "infinite"), (-math.inf, "infinite")])
def test_a_non_finite_loss_is_divergence_at_its_global_step(bad_loss: float, reason: str) -> None:
    found = first_divergence([2.3, 2.1, bad_loss, 1.9], first_step=100, upper_bound=None)
    assert found is not None
    assert (found.step, found.reason) == (102, reason)
    assert found.loss is bad_loss or (math.isnan(found.loss) and math.isnan(bad_loss))


def test_a_loss_above_the_upper_bound_is_divergence_and_the_bound_itself_is_not() -> None:
    assert first_divergence([5.0, 4.0], first_step=0, upper_bound=5.0) is None
    found = first_divergence([5.0, 5.5, 1.0], first_step=10, upper_bound=5.0)
    assert found == Divergence(11, 5.5, "above trainer.loss_upper_bound=5")
    assert found.describe() == "the loss of step 11 is 5.5 (above trainer.loss_upper_bound=5)"


def test_without_an_upper_bound_only_non_finite_losses_diverge() -> None:
    assert first_divergence([1e30, 2.0, -7.0], first_step=0, upper_bound=None) is None


def test_the_first_diverged_step_wins() -> None:
    found = first_divergence([1.0, 50.0, math.nan, math.inf], first_step=20, upper_bound=10.0)
    assert (found.step, found.loss, found.reason) == (21, 50.0, "above trainer.loss_upper_bound=10")
    found = first_divergence([1.0, math.inf, math.nan], first_step=20, upper_bound=None)
    assert (found.step, found.reason) == (21, "infinite")


def test_finite_losses_and_no_losses_are_no_divergence() -> None:
    assert first_divergence([2.3, 2.2, 0.0, -1.0], first_step=40, upper_bound=3.0) is None
    assert first_divergence([], first_step=40, upper_bound=3.0) is None


@pytest.mark.parametrize(("step", "skip_batches", "skip_from_step"), [
    (57, 10, 48),  # skip the batches of steps 48..57
    (57, 1, 57),  # only the diverged step's own batch
    (9, 10, 0),  # steps 0..9
    (3, 10, 0),  # fewer steps than batches to skip: never before step 0
    (0, 1, 0),
])
def test_plan_rollback_skips_the_batches_ending_with_the_diverged_one(step: int, skip_batches: int,
                                                                       skip_from_step: int) -> None:
    divergence = Divergence(step, math.nan, "NaN")
    plan = plan_rollback(divergence, skip_batches=skip_batches)
    assert (plan.skip_from_step, plan.skip_batches, plan.divergence) == (skip_from_step, skip_batches, divergence)
