"""Tasks: the seam between data, model and trainer (harness/tasks/).

In-process: every task config composes and builds; metric sums add up across batch shards (what
makes them exact for any replica and worker count) and give the textbook values; models that do
not fit a task are refused. With real processes: the README's own task trained from outside the
project; bad task/model/data combinations exit 2 before anything is written; mirrored equals one
device; a regression's divergence is rolled back. Each task's own kill-and-resume and export runs
are in tests/test_task_runs.py.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from harness.config import run_config
from harness.data.in_memory_sources import ExampleArrays
from harness.errors import ConfigError, DataError
from harness.results import inference
from harness.tasks import build_task, check_model_fits
from harness.tasks.classification import Classification
from harness.tasks.language_model import LanguageModel
from harness.tasks.regression import Regression
from scripts.tooling.chaos import compare_checkpoints
from tests.conftest import (
    PROJECT_ROOT,
    assert_ok,
    checkpoint_values,
    compose,
    event_scalars,
    run_train,
    subprocess_env,
)
from tests.test_task_runs import COMMON, METRICS, TASKS


# ---------------------------------------------------------------------------------------------
# Config and building
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "task_class", "data", "model"), [
    ("classification", Classification, "synthetic", "models.mlp.build_mlp"),
    ("regression", Regression, "diabetes", "models.mlp.build_mlp"),
    ("language_model", LanguageModel, "text", "models.transformer.build_transformer"),
])
def test_each_task_composes_with_its_data_and_model_and_builds(name: str, task_class: type, data: str,
                                                               model: str) -> None:
    run = run_config.to_typed_config(compose(f"task={name}", tiny=False))
    assert (run.data.name, run.model["_target_"]) == (data, model)
    assert type(build_task(run.task)) is task_class
    override = run_config.to_typed_config(
        compose(f"task={name}", "data=npz", "data.path=x.npz", "model=cnn", tiny=False))
    assert (override.data.name, override.model["_target_"]) == ("npz", "models.cnn.build_cnn")  # the user's pick wins


def test_task_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"task.loss' = 'l3' is invalid: expected one of \['mse', 'mae', 'huber'\]"):
        build_task(run_config.to_typed_config(compose("task=regression", "task.loss=l3", tiny=False)).task)
    with pytest.raises(ConfigError, match=r"'task._target_' = 'nowhere.Task' cannot be imported"):
        build_task({"_target_": "nowhere.Task"})
    with pytest.raises(ConfigError, match=r"'task._target_' = 'harness.data.pipeline.Batch' is not a subclass"):
        build_task({"_target_": "harness.data.pipeline.Batch"})
    with pytest.raises(ConfigError, match=r"'task.depth' is not an argument"):
        build_task({"_target_": "harness.tasks.regression.Regression", "depth": 3})


# ---------------------------------------------------------------------------------------------
# Metric sums: additive over shards of a batch, and the textbook values once reduced
# ---------------------------------------------------------------------------------------------
def _reduced(task, targets: np.ndarray, outputs: np.ndarray, weights: np.ndarray, *, shards: int) -> dict[str, float]:
    """The metrics after summing per-shard sums, as replicas and workers do."""
    totals: dict[str, float] = {"examples": float(weights.sum())}
    for part in range(shards):
        rows = slice(part * len(targets) // shards, (part + 1) * len(targets) // shards)
        sums = task.metric_sums(tf.constant(targets[rows]), tf.constant(outputs[rows]), tf.constant(weights[rows]))
        for name, value in sums.items():
            totals[name] = totals.get(name, 0.0) + float(value)
    assert set(totals) == {"examples", *task.sum_names}
    return task.metrics(totals)


def test_regression_metrics_are_exact_for_any_sharding() -> None:
    rng = np.random.default_rng(0)
    truth = rng.normal(150, 70, size=64).astype(np.float32)
    predicted = truth + rng.normal(0, 30, size=64).astype(np.float32)
    task = Regression()
    task.prepare(ExampleArrays(np.zeros((64, 1), np.float32), truth, np.zeros((64, 1), np.float32), truth))
    outputs = ((predicted - task.target_mean) / task.target_std)[:, None]  # the model works in standardised units
    targets = truth  # batches hold the targets as the data has them
    weights = np.ones(64, np.float32)
    weights[-4:] = 0.0  # eval padding counts for nothing
    real = slice(0, 60)
    residual = predicted[real] - truth[real]
    expected = {"rmse": math.sqrt(np.mean(residual ** 2)), "mae": np.mean(np.abs(residual)),
                "r2": 1 - np.sum(residual ** 2) / np.sum((truth[real] - truth[real].mean()) ** 2)}
    for shards in (1, 2, 4):
        assert _reduced(task, targets, outputs, weights, shards=shards) == pytest.approx(expected, rel=1e-4)


def test_classification_and_language_model_metrics_are_exact_for_any_sharding() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(32, 5)).astype(np.float32)
    labels = rng.integers(0, 5, size=32).astype(np.int32)
    weights = np.ones(32, np.float32)
    accuracy = float(np.mean(logits.argmax(axis=1) == labels))
    for shards in (1, 2, 4):
        assert _reduced(Classification(), labels, logits, weights, shards=shards) == pytest.approx(
            {"accuracy": accuracy})
    token_logits = rng.normal(size=(8, 6, 11)).astype(np.float32)
    tokens = rng.integers(0, 11, size=(8, 6)).astype(np.int32)
    log_probabilities = token_logits - np.log(np.exp(token_logits).sum(axis=-1, keepdims=True))
    mean_nll = -np.mean(np.take_along_axis(log_probabilities, tokens[..., None], axis=-1))
    for shards in (1, 2, 4):
        assert _reduced(LanguageModel(), tokens, token_logits, np.ones(8, np.float32), shards=shards) == pytest.approx(
            {"perplexity": math.exp(mean_nll), "bits_per_byte": mean_nll / math.log(2)}, rel=1e-5)


@pytest.mark.parametrize(("loss", "keras_loss"), [("mse", keras.losses.MeanSquaredError(reduction=None)),
                                                  ("mae", keras.losses.MeanAbsoluteError(reduction=None)),
                                                  ("huber", keras.losses.Huber(delta=1.0, reduction=None))])
def test_regression_losses_match_keras(loss: str, keras_loss: keras.losses.Loss) -> None:
    rng = np.random.default_rng(2)
    targets, outputs = rng.normal(size=(16, 3)).astype(np.float32), 2 * rng.normal(size=(16, 3)).astype(np.float32)
    ours = Regression(loss=loss).example_losses(tf.constant(targets), tf.constant(outputs))
    np.testing.assert_allclose(ours.numpy(), np.asarray(keras_loss(targets, outputs)), rtol=1e-6)


def test_a_model_whose_outputs_do_not_fit_the_task_is_refused() -> None:
    examples = ExampleArrays(np.zeros((4, 10), np.float32), np.ones(4, np.float32), np.zeros((2, 10), np.float32),
                             np.ones(2, np.float32))
    task = Regression()
    task.prepare(examples)
    ten_classes = keras.Sequential([keras.Input((10,)), keras.layers.Dense(10)])
    with pytest.raises(ConfigError, match=r"Task 'regression' expects model outputs of shape \(batch, 1\) for "
                                          r"inputs \(batch, 10\), but model 'head' returns \(batch, 10\)"):
        check_model_fits(task, ten_classes, examples, model_name="'head'")
    check_model_fits(task, keras.Sequential([keras.Input((10,)), keras.layers.Dense(1)]), examples, model_name="ok")


def test_language_model_refuses_negative_token_ids_and_float_inputs() -> None:
    tokens = np.array([[1, 2, -3]], np.int32)
    with pytest.raises(DataError, match=r"Task 'language_model': the train inputs hold token ids from -3"):
        LanguageModel(vocab_size=256).prepare(ExampleArrays(tokens, tokens, tokens, tokens))
    floats = np.zeros((2, 3), np.float32)
    with pytest.raises(DataError, match=r"the train inputs are float32 of shape \(2, 3\); expected integer token"):
        LanguageModel().prepare(ExampleArrays(floats, floats, floats, floats))


# ---------------------------------------------------------------------------------------------
# A user's own task, defined outside the project
# ---------------------------------------------------------------------------------------------
def readme_task_example() -> str:
    """The complete task of the README's "Writing a task" section, as a user would copy it."""
    readme = (PROJECT_ROOT / "README.md").read_text()
    section = readme[readme.index("### Writing a task"):]
    return section[section.index("```python\n") + len("```python\n"):section.index("```\n", section.index("```python"))]


@pytest.mark.slow
def test_the_readme_task_trains_from_outside_the_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = readme_task_example()
    assert len(code.strip().splitlines()) < 30
    (tmp_path / "my_tasks.py").write_text(code)
    (tmp_path / "my_conf" / "task").mkdir(parents=True)
    (tmp_path / "my_conf" / "task" / "binary.yaml").write_text("_target_: my_tasks.Binary\n")
    run_dir = tmp_path / "run"
    result = run_train(run_dir, f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", "task=binary",
                       "data.num_classes=2", "trainer.max_steps=60", "optimizer.learning_rate=0.01",
                       env=subprocess_env(PYTHONPATH=str(tmp_path)))
    assert_ok(result)
    assert "accuracy" in result.stderr + result.stdout  # the task's progress metric is shown
    accuracy = event_scalars(run_dir / "tensorboard")["eval/accuracy"]
    assert accuracy[-1][1] > 0.75, accuracy  # chance is 0.5: the user's loss and metric sums are the ones used
    assert "task: binary" in (run_dir / "model_signature.yaml").read_text()
    monkeypatch.syspath_prepend(str(tmp_path))  # where the user's code lives, as PYTHONPATH did for train.py
    loaded = inference.load(str(run_dir))
    assert type(loaded.task).__name__ == "Binary" and loaded.num_outputs == 1


# ---------------------------------------------------------------------------------------------
# Bad combinations: one paragraph naming the task, exit 2, nothing written
# ---------------------------------------------------------------------------------------------
BAD = {
    "float_labels_for_classification": (("data=npz", "data.path={values}"),
                                        r"Task 'classification': the train targets are floats that are not all "
                                        r"whole numbers .*use task=regression.*data=npz, data.path='.*values.npz'"),
    "transformer_on_image_data": (("data=digits", "model=transformer"),
                                  r"Task 'classification' expects model outputs of shape \(batch, 10\) for inputs "
                                  r"\(batch, 64\), but model 'transformer' .* returns \(batch, 64, 10\)"),
    "language_model_on_images": (("task=language_model", "data=digits"),
                                 r"Task 'language_model': the train inputs are float32 of shape \(1437, 64\)"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD))
def test_a_task_model_or_data_that_do_not_fit_exit_2_before_writing(tmp_path: Path, case: str) -> None:
    overrides, message = BAD[case]
    values = tmp_path / "values.npz"  # regression data: targets that are not class ids
    np.savez(values, features=np.ones((20, 3), np.float32), labels=np.linspace(0.5, 9.5, 20))
    overrides = tuple(override.format(values=values) for override in overrides)
    run_dir = tmp_path / "run"
    result = run_train(run_dir, *overrides, tiny=False)
    assert_ok(result, code=2)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert re.search(message, errors[0]), errors[0]
    assert "Traceback" not in result.stderr
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "run_record.json").exists()



@pytest.mark.slow
@pytest.mark.parametrize("task", ["regression", "language_model"])
def test_mirrored_on_two_cpu_replicas_trains_what_one_device_trains(tmp_path: Path, task: str) -> None:
    """Per-example losses over the *global* batch and summed metrics: the replica count changes nothing
    but the order of float additions (dropout off: its streams are per replica)."""
    overrides = (*COMMON, *TASKS[task], "model.dropout=0.0", "trainer.max_steps=20", "trainer.eval_every=20",
                 "export.enabled=false")
    single, mirrored = tmp_path / "single", tmp_path / "mirrored"
    assert_ok(run_train(single, *overrides, tiny=False))
    assert_ok(run_train(mirrored, *overrides, "strategy=mirrored", "strategy.cpu_replicas=2", tiny=False))
    first, second = (checkpoint_values(run / "checkpoints" / "ckpt-20") for run in (single, mirrored))
    assert first.keys() == second.keys()
    for name in first:
        np.testing.assert_allclose(np.asarray(second[name], np.float64), np.asarray(first[name], np.float64),
                                   atol=1e-4, err_msg=name)
    metric = METRICS[task]
    single_eval, mirrored_eval = (event_scalars(run / "tensorboard")[f"eval/{metric}"] for run in (single, mirrored))
    assert mirrored_eval[-1][1] == pytest.approx(single_eval[-1][1], rel=1e-3)


@pytest.mark.slow
def test_regression_rolls_back_a_divergence_and_ends_where_an_interrupted_run_ends(tmp_path: Path) -> None:
    """Rollback knows nothing about tasks: a NaN in a regression's loss is rolled back like any other."""
    from tests.test_operations import MARKED_STEP, NAN_MODEL, OPERATIONS, write_marked_data

    overrides = (*OPERATIONS, *write_marked_data(tmp_path / "data"), NAN_MODEL, "task=regression")
    reference = tmp_path / "reference"
    result = run_train(reference, *overrides, tiny=False)
    assert_ok(result)
    assert f"rollback 1 of 3: the loss of step {MARKED_STEP} is nan (NaN)" in result.stdout + result.stderr
    assert "rmse" in result.stdout + result.stderr
    interrupted = tmp_path / "interrupted"
    assert_ok(run_train(interrupted, *overrides, "trainer.max_steps=25", tiny=False))
    assert_ok(run_train(interrupted, *overrides, tiny=False))
    assert compare_checkpoints(reference / "checkpoints" / "ckpt-60", interrupted / "checkpoints" / "ckpt-60") == []


def test_each_task_names_the_first_example_of_a_batch_that_its_prepare_would_refuse() -> None:
    """What file-backed batches are checked with as they are read (the sample `prepare` saw was fine)."""
    inputs = np.zeros((4, 3), np.float32)
    classification, language_model, regression = Classification(4), LanguageModel(256), Regression()
    assert classification.invalid_example(inputs, np.array([0, 3, 1, 2], np.int32)) is None
    assert classification.invalid_example(inputs, np.array([0, 3, 4, -1], np.int32)) == (
        2, "has label 4; expected a class id in [0, 3] (task 'classification' has 4 classes: set task.num_classes "
           "or data.num_classes to the real count)")
    assert classification.invalid_example(inputs, np.array([[0.0], [1.5], [1.0], [2.0]], np.float32))[0] == 1
    tokens = np.arange(20, dtype=np.int32).reshape(4, 5)
    assert language_model.invalid_example(tokens, tokens + 1) is None
    found = language_model.invalid_example(tokens, np.where(tokens == 17, 256, tokens))
    assert found is not None and found[0] == 3 and found[1].startswith("has token id 256; expected ids in [0, 255]")
    assert language_model.invalid_example(np.where(tokens == 6, -1, tokens), tokens)[0] == 1
    assert regression.invalid_example(inputs, np.array([[1.0, 2.0], [3.0, 4.0]] * 2, np.float32)) is None
    assert regression.invalid_example(inputs, np.array([[1.0, 2.0], [3.0, np.inf], [np.nan, 0.0], [0.0, 0.0]],
                                                       np.float32)) == (
        1, "has target [ 3. inf]; expected finite numbers (task 'regression')")
