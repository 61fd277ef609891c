"""Shared fixtures: a tiny config that trains in seconds, and helpers to run train.py for real."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TRAIN_PY = PROJECT_ROOT / "train.py"

# Small enough for seconds per run, big enough to cross several log/eval/checkpoint boundaries.
TINY = (
    "data.num_examples=2304",
    "data.eval_examples=256",
    "data.global_batch_size=64",
    "model.hidden=[32]",
    "trainer.max_steps=60",
    "trainer.steps_per_loop=10",
    "trainer.log_every=10",
    "trainer.eval_every=30",
    "checkpoint.every_steps=20",
    "export.enabled=false",  # tests of export turn it back on
)


# The files that take longest (their tests run train.py subprocesses), longest first. pyproject runs
# the suite with `--dist loadfile --no-loadscope-reorder`: xdist hands whole files to its workers in
# collection order, so these start first and the many short files fill in around them, instead of a
# long file starting last and running alone at the end.
LONGEST_FILES_FIRST = (
    "test_task_runs.py", "test_fault_tolerance.py", "test_slurm.py", "test_distributed.py",
    "test_performance_options.py", "test_operations.py", "test_tasks.py", "test_file_sources.py",
    "test_shared_filesystem.py", "test_train_end_to_end.py", "test_checkpoint_pacing.py", "test_inference.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: position for position, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept within a file


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: quiet TF, unbuffered output, no inherited cluster."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG",) and not k.startswith("SLURM_")}
    env.update({"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"})
    env.update(extra)
    return env


def train_command(run_dir: Path, *overrides: str, tiny: bool = True) -> list[str]:
    return [sys.executable, str(TRAIN_PY), f"run_dir={run_dir}", *(TINY if tiny else ()), *overrides]


def run_train(run_dir: Path, *overrides: str, tiny: bool = True, timeout: float = 240,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run train.py to completion and return its result (stdout and stderr captured as text)."""
    return subprocess.run(train_command(run_dir, *overrides, tiny=tiny), cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env or subprocess_env())


def compose(*overrides: str, tiny: bool = True):
    """The composed DictConfig train.py would get, via Hydra's compose API."""
    from harness.config.composition import compose as compose_config

    return compose_config([*(TINY if tiny else ()), *overrides])


def checkpoint_values(path: str | Path) -> dict[str, object]:
    """Every training-state variable of a checkpoint as numpy, read with TensorFlow's own reader
    (not the object graph, nor the provenance record, which names the process that wrote it)."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(path))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name not in ("_CHECKPOINTABLE_OBJECT_GRAPH", "provenance/.ATTRIBUTES/VARIABLE_VALUE")}


def event_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalar tag -> [(step, value)] as TensorBoard's own Python loader (EventAccumulator) sees the run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


def assert_ok(result: subprocess.CompletedProcess[str], code: int = 0) -> None:
    assert result.returncode == code, (
        f"exit {result.returncode} (expected {code})\n--- stdout ---\n{result.stdout[-4000:]}\n"
        f"--- stderr ---\n{result.stderr[-4000:]}")
