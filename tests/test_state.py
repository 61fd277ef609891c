"""harness/training/state.py: the skip schedule that divergence rollbacks write, and the input position it gives."""

from __future__ import annotations

import keras
import pytest

from harness.training.state import MAX_SKIPS, create_train_state


@pytest.fixture
def state():
    inputs = keras.Input(shape=(4,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="logits")(inputs))
    return create_train_state(model, keras.optimizers.Adam())


def test_each_skip_counts_from_its_step_on(state) -> None:
    assert state.skips() == [] and state.batch_index == 0
    state.set_skips([(29, 5), (40, 10)])
    assert [state.skipped_before(step) for step in (0, 28, 29, 39, 40, 100)] == [0, 0, 5, 5, 15, 15]
    state.step.assign(35)
    assert state.batch_index == 40
    state.set_skips(state.skips())
    assert int(state.skipped_batches.numpy()) == 5, "kept up to date for people reading a checkpoint"
    assert "skip_schedule" in state.checkpoint_items()


def test_a_full_schedule_is_refused(state) -> None:
    with pytest.raises(ValueError, match=f"more than {MAX_SKIPS} rollbacks"):
        state.set_skips([(step, 1) for step in range(MAX_SKIPS + 1)])
