"""Each shipped task end to end, with real processes (tests/test_tasks.py has the rest of the seam).

Per task (MobileNetV2 from keras.applications included): train, SIGKILL after a checkpoint, resume
bit-exactly with the same TensorBoard curve, and reload the export with the same outputs; the
regression's R² and predictions in target units; text sampled from a language model's checkpoint.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from harness.config import run_config
from harness.errors import HarnessError
from harness.results import inference
from harness.results.generation import generate_text
from harness.training import assembly
from scripts.tooling.chaos import compare_checkpoints
from tests.background import sigkill_after_checkpoint
from tests.conftest import (
    PROJECT_ROOT,
    assert_ok,
    compose,
    event_scalars,
    run_train,
    subprocess_env,
    train_command,
)

# ---------------------------------------------------------------------------------------------
# End to end, per shipped task: SIGKILL and resume bit-exactly, export reloads with the same outputs
# ---------------------------------------------------------------------------------------------
COMMON = ("deterministic=true", "trainer.max_steps=40", "trainer.steps_per_loop=5", "trainer.log_every=5",
          "trainer.eval_every=20", "checkpoint.every_steps=10")
TASKS = {
    "classification": ("model.dropout=0.2", "model.hidden=[32]", "data.num_examples=2304", "data.eval_examples=256",
                       "data.global_batch_size=64"),
    "regression": ("task=regression", "task.loss=huber", "model.dropout=0.1"),
    "language_model": ("task=language_model", "data.seq_len=32", "data.global_batch_size=16", "model.num_layers=1",
                       "model.d_model=32", "model.num_heads=2", "model.mlp_dim=64", "model.dropout=0.1",
                       "optimizer.learning_rate=0.003"),
    "mobilenet_v2": ("model=mobilenet_v2", "data=digits", "data.global_batch_size=16", "trainer.max_steps=10",
                     "trainer.eval_every=10", "checkpoint.every_steps=5"),
}
METRICS = {"classification": "accuracy", "regression": "r2", "language_model": "perplexity",
           "mobilenet_v2": "accuracy"}


def _setting(overrides: tuple[str, ...], key: str) -> int:
    """The last value `overrides` give `key` (later overrides win, as on the command line)."""
    return next(int(o.split("=")[1]) for o in reversed(overrides) if o.startswith(f"{key}="))


def _final(run_dir: Path, overrides: tuple[str, ...]) -> Path:
    return run_dir / "checkpoints" / f"ckpt-{_setting((*COMMON, *overrides), 'trainer.max_steps')}"


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory):
    """`reference_run(task)`: the task's uninterrupted run with its export, trained once per module."""
    runs: dict[str, Path] = {}

    def train_once(task: str) -> Path:
        if task not in runs:
            runs[task] = tmp_path_factory.mktemp(task) / "reference"
            assert_ok(run_train(runs[task], *COMMON, *TASKS[task], "export.enabled=true", tiny=False))
        return runs[task]

    return train_once


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(TASKS))
def test_task_resumes_bit_exactly_after_sigkill_and_exports_its_outputs(tmp_path: Path, task: str,
                                                                        reference_run) -> None:
    overrides = (*COMMON, *TASKS[task])
    reference = reference_run(task)
    scalars = event_scalars(reference / "tensorboard")
    assert f"eval/{METRICS[task]}" in scalars and f"train/{METRICS[task]}" in scalars, sorted(scalars)

    killed = tmp_path / "killed"
    overrides = (*overrides, "export.enabled=false")
    first_checkpoint = _setting(overrides, "checkpoint.every_steps")
    sigkill_after_checkpoint(train_command(killed, *overrides, tiny=False), first_checkpoint, env=subprocess_env())
    resumed = run_train(killed, *overrides, tiny=False)
    assert_ok(resumed)
    assert "resuming from checkpoint" in resumed.stdout + resumed.stderr
    assert compare_checkpoints(_final(killed, overrides), _final(reference, overrides)) == []
    # TensorBoard: each logged step once, with the uninterrupted run's value (the killed process's
    # points after its checkpoint are dropped by the restart marker).
    curves, expected_curves = event_scalars(killed / "tensorboard"), scalars
    for tag in ("train/loss", f"train/{METRICS[task]}", f"eval/{METRICS[task]}"):
        assert curves[tag] == pytest.approx(expected_curves[tag], abs=1e-6), tag

    loaded = inference.load(str(reference))
    run = run_config.to_typed_config(compose(*overrides, f"run_dir={reference}", tiny=False))
    inputs = assembly.load_task_data(run).examples.eval_features[:8]
    expected = np.asarray(loaded.task.serving_outputs(tf.constant(inference.predict_outputs(loaded.model, inputs))))
    served = tf.saved_model.load(str(reference / "export" / "saved_model"))
    np.testing.assert_allclose(served.serve(tf.constant(inputs)).numpy(), expected, rtol=1e-5, atol=1e-5)
    reloaded = keras.saving.load_model(reference / "export" / "model.keras")
    np.testing.assert_allclose(np.asarray(reloaded(inputs, training=False)),
                               inference.predict_outputs(loaded.model, inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_regression_reaches_r2_of_0_4_and_predict_prints_values_in_target_units(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert_ok(run_train(run_dir, "task=regression", "trainer.max_steps=600", "trainer.eval_every=300",
                        "checkpoint.every_steps=300", "trainer.steps_per_loop=50", tiny=False))
    r2 = event_scalars(run_dir / "tensorboard")["eval/r2"]
    assert [step for step, _ in r2] == [300, 600] and r2[-1][1] >= 0.4, r2
    examples = assembly.load_task_data(run_config.to_typed_config(compose("task=regression", tiny=False))).examples
    np.save(tmp_path / "inputs.npy", examples.eval_features[:5])
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts" / "predict.py"), str(run_dir),
                             str(tmp_path / "inputs.npy")], capture_output=True, text=True, env=subprocess_env(),
                            cwd=PROJECT_ROOT, timeout=120)
    assert_ok(result)
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "row,prediction" and len(lines) == 6
    predictions = np.array([float(line.split(",")[1]) for line in lines[1:]])
    assert predictions.min() > 25 and predictions.max() < 350  # disease progression units, not standardised
    diff = subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts" / "inspect_checkpoint.py"), str(run_dir),
                           "--diff", "task=regression"], capture_output=True, text=True, env=subprocess_env(),
                          cwd=PROJECT_ROOT, timeout=120)
    assert_ok(diff)
    assert "resume with this config (train.py): would restore" in diff.stdout, diff.stdout
    warm = run_train(tmp_path / "warm", "task=regression", f"init_from={run_dir}", "trainer.max_steps=10",
                     "trainer.steps_per_loop=10", "checkpoint.every_steps=10", "export.enabled=false", tiny=False)
    assert_ok(warm)
    assert "restored 4 of 4 model variables (optimizer fresh, step 0)" in warm.stdout + warm.stderr


@pytest.mark.slow
def test_language_model_generates_text_from_a_checkpoint(tmp_path: Path, reference_run) -> None:
    run_dir = reference_run("language_model")
    command = [sys.executable, str(PROJECT_ROOT / "scripts" / "generate.py"), str(run_dir), "--prompt", "The ",
               "--length", "40", "--seed", "3"]
    first, second = (subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), cwd=PROJECT_ROOT,
                                    timeout=120) for _ in range(2))
    assert_ok(first)
    assert first.stdout.startswith("The ") and len(first.stdout.rstrip("\n")) >= 40
    assert first.stdout == second.stdout  # same seed, same text
    missing = subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts" / "generate.py"), str(run_dir / "nope"),
                              "--prompt", "x"], capture_output=True, text=True, env=subprocess_env(),
                             cwd=PROJECT_ROOT, timeout=120)
    assert_ok(missing, code=2)
    with pytest.raises(HarnessError, match=r"trained task 'classification' with 10 outputs: expected a byte-level "
                                           r"language model"):
        generate_text(inference.load(str(reference_run("classification"))), "x", length=1, temperature=0, seed=0)


