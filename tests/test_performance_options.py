"""The speed options run and resume exactly: steps_per_loop, data.prefetch, checkpoint.async, XLA, mixed precision.

Each option is run for real, as a user would: `train.py` to step 30, then rerun with max_steps=60 (a
kill-free resume). Options that keep the numerics must end bit-identical to an uninterrupted run
with the defaults; options that change them must end bit-identical to their own uninterrupted run,
and differ from the defaults (so the option really took effect). Speed itself is measured by
scripts/benchmark.py, never asserted here.
"""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest

from scripts.tooling.chaos import compare_checkpoints, run_attempt
from tests.conftest import PROJECT_ROOT, assert_ok, checkpoint_values, run_train, subprocess_env, train_command

EXACT = ("deterministic=true", "export.enabled=false", "trainer.progress=log")
HALF, FULL = 30, 60  # TINY's max_steps is 60
LOSS_SCALE_KEYS = ("optimizer/dynamic_scale/.ATTRIBUTES/VARIABLE_VALUE",
                   "optimizer/step_counter/.ATTRIBUTES/VARIABLE_VALUE")


def final_checkpoint(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / f"ckpt-{FULL}"


def run_then_resume(run_dir: Path, *overrides: str) -> None:
    """Train to HALF, then rerun the same command with max_steps=FULL; the rerun must resume at HALF."""
    for max_steps, resumed_from in ((HALF, 0), (FULL, HALF)):
        attempt = run_attempt(train_command(run_dir, *EXACT, *overrides, f"trainer.max_steps={max_steps}"),
                              kill_signal=None, cwd=str(PROJECT_ROOT), env=subprocess_env())
        assert attempt.exit_code == 0, attempt.output[-4000:]
        assert attempt.resumed_from == resumed_from, attempt.output[-4000:]
        assert attempt.last_step_seen == max_steps


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Uninterrupted run with every speed option at its default."""
    run_dir = tmp_path_factory.mktemp("default") / "run"
    assert_ok(run_train(run_dir, *EXACT))
    return run_dir


# ---------------------------------------------------------------------------------------------
# Options that keep the numerics: same checkpoint as the defaults, bit for bit
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("option", ["trainer.steps_per_loop=7", "data.prefetch=2", "checkpoint.async=true"])
def test_option_runs_and_resumes_bit_identical_to_the_defaults(tmp_path: Path, default_run: Path,
                                                               option: str) -> None:
    run_dir = tmp_path / "run"
    run_then_resume(run_dir, option)
    assert compare_checkpoints(final_checkpoint(run_dir), final_checkpoint(default_run)) == []


@pytest.mark.slow
def test_async_preemption_waits_for_the_save_in_flight(tmp_path: Path) -> None:
    """SIGTERM mid-run with async saves: the stop checkpoint is complete and recorded as latest at exit."""
    import tensorflow as tf

    run_dir = tmp_path / "run"
    command = train_command(run_dir, *EXACT, "checkpoint.async=true", "trainer.max_steps=2000",
                            "trainer.steps_per_loop=5", "trainer.log_every=5", "checkpoint.every_steps=25")
    stopped = run_attempt(command, kill_signal=signal.SIGTERM, kill_fraction=0.4, cwd=str(PROJECT_ROOT),
                          env=subprocess_env())
    assert stopped.exit_code == 42, stopped.output[-4000:]
    assert stopped.stopped_at is not None and 0 < stopped.stopped_at < 2000
    latest = tf.train.latest_checkpoint(str(run_dir / "checkpoints"))
    assert latest is not None and latest.endswith(f"ckpt-{stopped.stopped_at}")
    saved = checkpoint_values(latest)  # reads every tensor: TensorFlow checks each one's checksum
    assert saved["step/.ATTRIBUTES/VARIABLE_VALUE"] == stopped.stopped_at
    assert not list((run_dir / "checkpoints").glob("*temp*")), "a temporary file of the async save was left"


# ---------------------------------------------------------------------------------------------
# Options that change the numerics: a resumed run equals its own uninterrupted run
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("option", ["trainer.jit_compile=true", "trainer.mixed_precision=mixed_float16",
                                    "trainer.mixed_precision=mixed_bfloat16"])
def test_numerics_option_resumes_bit_identical_to_its_uninterrupted_run(tmp_path: Path, default_run: Path,
                                                                        option: str) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert_ok(run_train(straight, *EXACT, option))
    run_then_resume(resumed, option)
    assert compare_checkpoints(final_checkpoint(resumed), final_checkpoint(straight)) == []
    assert compare_checkpoints(final_checkpoint(straight), final_checkpoint(default_run)) != [], \
        f"{option} trained exactly like the defaults: the option had no effect"
    values = checkpoint_values(final_checkpoint(resumed))
    assert all(np.isfinite(v).all() for v in values.values() if np.asarray(v).dtype.kind == "f")
    if option.endswith("mixed_float16"):  # the loss-scale state is checkpointed and carried over the resume
        assert values[LOSS_SCALE_KEYS[1]] == FULL and values[LOSS_SCALE_KEYS[0]] > 1
    else:
        assert not set(LOSS_SCALE_KEYS) & set(values)


# ---------------------------------------------------------------------------------------------
# In-process checks of the pieces behind the options
# ---------------------------------------------------------------------------------------------
def test_step_iterator_yields_the_batches_of_the_tf_data_pipeline() -> None:
    """data.prefetch=0 (batches gathered inside the step) and >0 (tf.data) feed identical batches."""
    import tensorflow as tf

    from harness.config.schema import SyntheticDataConfig
    from harness.data.in_memory_sources import synthetic
    from harness.data.pipeline import SeekableInput, StepIterator

    examples = synthetic(SyntheticDataConfig(input_dim=4, num_examples=200, eval_examples=40))
    strategy = tf.distribute.get_strategy()

    def iterator(prefetch: int, start_step: int):
        pipeline = SeekableInput(examples, global_batch_size=32, eval_batch_size=32, shuffle_seed=3,
                                 prefetch=prefetch, num_replicas=1)
        return pipeline.distributed_train_iterator(strategy, start_step=start_step)

    in_step, pipelined = iterator(0, start_step=4), iterator(2, start_step=4)
    assert isinstance(in_step, StepIterator) and not isinstance(pipelined, StepIterator)
    for _ in range(7):  # crosses the epoch boundary at 5 steps (160 / 32)
        ours, theirs = next(in_step), next(pipelined)
        np.testing.assert_array_equal(ours.features.numpy(), theirs.features.numpy())
        np.testing.assert_array_equal(ours.targets.numpy(), theirs.targets.numpy())

    traced = iterator(0, start_step=0)
    last = tf.Variable(tf.zeros([32], tf.int32))

    @tf.function
    def consume(source, count: tf.Tensor) -> None:
        for _ in tf.range(count):
            last.assign(next(source).targets)

    consume(traced, tf.constant(6, tf.int64))
    assert int(traced.position.numpy()) == 6
    np.testing.assert_array_equal(last.numpy(), iterator(2, start_step=5).__next__().targets.numpy())


def test_mixed_float16_wraps_the_optimizer_and_checkpoints_the_loss_scale() -> None:
    import keras

    from harness.config.schema import AdamConfig
    from harness.training import optimization, state
    from models.mlp import build_mlp

    previous = keras.mixed_precision.global_policy()
    try:
        for policy, scaled in (("mixed_float16", True), ("mixed_bfloat16", False), ("float32", False)):
            keras.mixed_precision.set_global_policy(policy)
            model = build_mlp(input_shape=(4,), num_outputs=3, hidden=[8])
            optimizer = optimization.build_optimizer(AdamConfig(), max_steps=10)
            assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer) == scaled, policy
            tree = state.create_train_state(model, optimizer).checkpoint_items()["optimizer"]
            assert ({"dynamic_scale", "step_counter"} <= set(tree)) == scaled, sorted(tree)
    finally:
        keras.mixed_precision.set_global_policy(previous)


def test_thread_pools_take_effect_only_in_a_process_that_has_not_started_tensorflow() -> None:
    """TensorFlow fixes its pools when it starts: where it has (train.train called in-process, as here), a thread
    count is refused as a config error naming the key, not TensorFlow's RuntimeError; 0 (its default) always
    passes. A negative count is refused with the config. (train.py sets them for real: tests/test_file_sources.py.)"""
    import tensorflow as tf

    from harness import runtime
    from harness.config.run_config import to_typed_config
    from harness.errors import ConfigError
    from tests.conftest import compose

    _ = tf.constant(1.0) + 1  # TensorFlow has started in this process
    runtime.configure_threads(intra_op=0, inter_op=0)
    for key in ("intra_op", "inter_op"):
        counts = {"intra_op": 0, "inter_op": 0, key: 64}
        with pytest.raises(ConfigError, match=rf"'trainer.{key}_threads' = 64 cannot take effect.*fresh process"):
            runtime.configure_threads(**counts)
    with pytest.raises(ConfigError, match=r"'trainer.inter_op_threads' = -1 is invalid"):
        to_typed_config(compose("trainer.inter_op_threads=-1"))


def test_file_backed_input_on_a_cpu_only_host_is_advised_to_leave_a_core_to_its_reads(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the step's ops may take every core (TensorFlow's default pools, no accelerator, several cores), file
    reads compete with them: the advice names the setting that leaves a core to the input. Not for data held in
    memory, on one core, with accelerators, or with the pool already sized. (train.py's call: test_file_sources.)"""
    import logging

    import tensorflow as tf

    from harness import runtime

    assert not tf.config.threading.get_intra_op_parallelism_threads()  # this process runs TensorFlow's defaults
    monkeypatch.delenv("TF_NUM_INTRAOP_THREADS", raising=False)
    with caplog.at_level(logging.INFO, logger="harness.runtime"):
        advice = runtime.advise_a_core_for_the_input(file_backed=True, cores=4, accelerators=False)
    assert advice is not None and "`trainer.intra_op_threads=3` leaves a core to the input" in advice
    assert advice in caplog.text
    for host in ({"file_backed": False, "cores": 4, "accelerators": False},
                 {"file_backed": True, "cores": 1, "accelerators": False},
                 {"file_backed": True, "cores": 4, "accelerators": True}):
        assert runtime.advise_a_core_for_the_input(**host) is None, host
    monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", "3")
    assert runtime.advise_a_core_for_the_input(file_backed=True, cores=4, accelerators=False) is None
