"""Divergence: which step's loss went bad, and what a rollback restores and skips.

Owns: the rule that declares a step diverged (its global loss is NaN, infinite, or above
`trainer.loss_upper_bound`) and the rollback plan, which is a pure function of that step, so that
a killed-and-resumed run rolls back exactly as an uninterrupted one does:
- Diverged at step `k` (the loss of the update that starts at step `k`, computed on batch
  `k + skipped_batches`): skip `trainer.rollback_skip_batches` = `N` batches, the ones that steps
  `k-N+1 .. k` consumed (the culprit may be a batch before the one whose loss shows it).
- Add (`k-N+1`, `N`) to the skip schedule (`harness/training/state.py`: step `s` reads batch `s` plus
  the batches of every entry starting at or before `s`), restore the newest checkpoint at or
  before step `k-N+1` but keep the schedule known now, delete the newer checkpoints (the
  abandoned trajectory, which a restart must not resume from), and replay to step `k-N+1`
  (bit-identical under `deterministic=true`: same state, same batches), where the skip begins.
  Which checkpoint is restored does not change the result, so preemption checkpoints at odd
  steps do not either.
The controller (`harness/control/controller.py`) carries the plan out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Divergence:
    step: int  # global step whose loss diverged (before its update)
    loss: float
    reason: str

    def describe(self) -> str:
        return f"the loss of step {self.step} is {self.loss:g} ({self.reason})"


@dataclass(frozen=True)
class RollbackPlan:
    divergence: Divergence
    skip_from_step: int  # from this step on, every step reads `skip_batches` batches further along
    skip_batches: int


def first_divergence(losses: list[float], *, first_step: int, upper_bound: float | None) -> Divergence | None:
    """The first of consecutive steps `first_step, first_step + 1, ...` whose loss diverged, if any."""
    for offset, loss in enumerate(losses):
        if math.isnan(loss):
            return Divergence(first_step + offset, loss, "NaN")
        if math.isinf(loss):
            return Divergence(first_step + offset, loss, "infinite")
        if upper_bound is not None and loss > upper_bound:
            return Divergence(first_step + offset, loss, f"above trainer.loss_upper_bound={upper_bound:g}")
    return None


def plan_rollback(divergence: Divergence, *, skip_batches: int) -> RollbackPlan:
    return RollbackPlan(divergence, skip_from_step=max(divergence.step - skip_batches + 1, 0),
                        skip_batches=skip_batches)
