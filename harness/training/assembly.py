"""Building a run's parts from its config: the task and its examples, the model, the training state.

Owns the one recipe that `train.py`, the checkpoint inspector (`--diff`) and the benchmark share,
so that each builds exactly the model and state a run trains. Bad combinations (a model whose
outputs do not fit the task, targets the task cannot learn) are refused here, before anything
is written.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras

from harness.config.run_config import RunConfig
from harness.config.schema import DataConfig
from harness.data import file_sources
from harness.data import in_memory_sources as data_sources
from harness.data.file_sources import FileExamples
from harness.data.in_memory_sources import ExampleArrays
from harness.errors import DataError
from harness.tasks import Task, build_task, check_model_fits
from harness.training import modeling, optimization, state


@dataclass(frozen=True)
class TaskData:
    """The task and the examples it trains on (targets checked and prepared).

    `examples` are in memory or read from files by index; `sample` is in memory either way (the
    examples themselves, or the first records of each split): what the task and the model checks see.
    """

    task: Task
    examples: ExampleArrays | FileExamples
    sample: ExampleArrays


def load_data(config: DataConfig) -> ExampleArrays | FileExamples:
    """The examples of `data.*`: file-backed sources are opened (never loaded), the others loaded."""
    in_memory = config.name not in file_sources.SOURCES or (config.name == "text" and config.path is None)
    return data_sources.load_examples(config) if in_memory else file_sources.SOURCES[config.name](config)


def load_task_data(run: RunConfig) -> TaskData:
    """Build the task, load the data source, and let the task check and prepare the targets.

    Also records the data set's size in the resolved config as `data.records` (`run.resolved`, which
    checkpoints' provenance holds), so a resume on files that gained or lost records is refused like
    any other change of what is trained.
    """
    task = build_task(run.task)
    examples = load_data(run.data)
    counts = (examples.num_train, examples.num_eval) if isinstance(examples, FileExamples) else (
        len(examples.train_targets), len(examples.eval_targets))
    run.resolved["data"]["records"] = {"train": int(counts[0]), "eval": int(counts[1])}
    try:
        if isinstance(examples, FileExamples):  # batches stay as the files hold them, each checked by the task
            sample = task.prepare(examples.sample())
            return TaskData(task, examples.checked(task.invalid_example), sample)
        prepared = task.prepare(examples)
        return TaskData(task, prepared, prepared)
    except DataError as error:  # the task cannot name the data: say which data it was
        path = getattr(run.data, "path", None)
        raise DataError(f"{error} (The data: data={run.data.name}{f', data.path={path!r}' if path else ''}.)") from None


def build_model(run: RunConfig, task_data: TaskData) -> keras.Model:
    """The configured model, sized for the task and checked against it. Call inside `strategy.scope()`."""
    model = modeling.build_model(run.model, input_shape=task_data.examples.input_shape,
                                 num_outputs=task_data.task.num_outputs, seed=run.seed)
    check_model_fits(task_data.task, model, task_data.sample, model_name=f"'{model.name}' ({run.model['_target_']})")
    return model


def build_train_state(run: RunConfig, task_data: TaskData) -> state.TrainState:
    """Model, optimizer (slots built) and counters: what a checkpoint holds. Call inside `strategy.scope()`."""
    model = build_model(run, task_data)
    optimizer = optimization.build_optimizer(run.optimizer, max_steps=run.trainer.max_steps)
    return state.create_train_state(model, optimizer)
