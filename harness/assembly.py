"""Building a run's parts from its config: the task and its examples, the model, the training state.

Owns the one recipe that `train.py`, the checkpoint inspector (`--diff`) and the benchmark share,
so that each builds exactly the model and state a run trains. Bad combinations (a model whose
outputs do not fit the task, targets the task cannot learn) are refused here, before anything
is written.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras

from harness import data_sources, modeling, optimization, state
from harness.config import RunConfig
from harness.data_sources import ExampleArrays
from harness.errors import DataError
from harness.tasks import Task, build_task, check_model_fits


@dataclass(frozen=True)
class TaskData:
    """The task and the examples in the form it trains on (targets checked and prepared)."""

    task: Task
    examples: ExampleArrays


def load_task_data(run: RunConfig) -> TaskData:
    """Build the task, load the data source, and let the task check and prepare the targets."""
    task = build_task(run.task)
    examples = data_sources.load_examples(run.data)
    try:
        return TaskData(task, task.prepare(examples))
    except DataError as error:  # the task cannot name the data: say which data it was
        path = getattr(run.data, "path", None)
        raise DataError(f"{error} (The data: data={run.data.name}{f', data.path={path!r}' if path else ''}.)") from None


def build_model(run: RunConfig, task_data: TaskData) -> keras.Model:
    """The configured model, sized for the task and checked against it. Call inside `strategy.scope()`."""
    model = modeling.build_model(run.model, input_shape=task_data.examples.input_shape,
                                 num_outputs=task_data.task.num_outputs, seed=run.seed)
    check_model_fits(task_data.task, model, task_data.examples, model_name=f"'{model.name}' ({run.model['_target_']})")
    return model


def build_train_state(run: RunConfig, task_data: TaskData) -> state.TrainState:
    """Model, optimizer (slots built) and counters: what a checkpoint holds. Call inside `strategy.scope()`."""
    model = build_model(run, task_data)
    optimizer = optimization.build_optimizer(run.optimizer, max_steps=run.trainer.max_steps)
    return state.create_train_state(model, optimizer)
