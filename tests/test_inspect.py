"""Inspecting checkpoints: listing with intactness, variable tables, and what a config would not restore.

Checkpoints are written by the harness's own `Checkpointer` (in this process, for speed); the
command-line script is run as a subprocess on them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.checkpoint import contents as checkpoint_contents
from harness.checkpoint import provenance
from harness.checkpoint.checkpointer import Checkpointer
from harness.config import run_config
from harness.errors import CheckpointError
from harness.operations import run_dir as run_files
from harness.operations.run_record import RunAccounting
from harness.results import inspection
from harness.training import assembly
from tests.conftest import PROJECT_ROOT, TINY, assert_ok, compose, subprocess_env

SCRIPT = PROJECT_ROOT / "scripts" / "inspect_checkpoint.py"


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory with ckpt-20/40/60 of the TINY config and its records, as train.py leaves it."""
    run_dir = tmp_path_factory.mktemp("inspect") / "run"
    run = run_config.to_typed_config(compose(f"run_dir={run_dir}"))
    task_data = assembly.load_task_data(run)
    train_state = assembly.build_train_state(run, task_data)
    record = provenance.to_text(provenance.build_provenance(run.resolved, overrides=("trainer.max_steps=60",)))
    checkpointer = Checkpointer.from_config(train_state, run.checkpoint, async_save=False, is_chief=True,
                                            provenance=record)
    accounting = RunAccounting(run.run_dir, writer=True, max_crash_restarts=3, fingerprint="test")
    accounting.begin(start_step=0, process_started=time.time())
    for step in (20, 40, 60):
        train_state.step.assign(step)
        checkpointer.save(step)
    accounting.finish("completed", step=60)
    run_files.write_config_record(run.run_dir, run.resolved)
    run_files.write_model_signature(run.run_dir, input_shape=task_data.examples.input_shape,
                                    input_dtype=task_data.examples.input_dtype, task=task_data.task)
    return run_dir


def test_a_run_directory_lists_its_checkpoints_newest_first(saved_run: Path) -> None:
    located = inspection.locate(str(saved_run))
    assert located.run_dir == str(saved_run) and located.directory == str(saved_run / "checkpoints")
    infos = inspection.describe(located)
    assert [info.step for info in infos] == [60, 40, 20]
    assert all(info.intact for info in infos)
    for info in infos:
        files = list(saved_run.glob(f"checkpoints/ckpt-{info.step}.*"))
        assert info.size_bytes == sum(f.stat().st_size for f in files) > 0
        assert info.modified is not None
    assert inspection.newest_intact(located).endswith("ckpt-60")
    assert inspection.select(located, 40).endswith("ckpt-40")
    with pytest.raises(CheckpointError, match=r"No checkpoint at step 50 .* holds steps \[60, 40, 20\]"):
        inspection.select(located, 50)


def test_a_prefix_or_an_index_file_names_one_checkpoint(saved_run: Path) -> None:
    for path in (saved_run / "checkpoints" / "ckpt-40", saved_run / "checkpoints" / "ckpt-40.index"):
        located = inspection.locate(str(path))
        assert located.chosen == str(saved_run / "checkpoints" / "ckpt-40")
        assert len(located.checkpoints) == 3
    with pytest.raises(CheckpointError, match=r"does not exist"):
        inspection.locate(str(saved_run / "checkpoints" / "ckpt-41"))
    with pytest.raises(CheckpointError, match=r"config.yaml' is a file but no checkpoint"):
        inspection.locate(str(saved_run / "config.yaml"))


def test_corrupted_and_truncated_checkpoints_are_not_intact(saved_run: Path, tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    shutil.copytree(saved_run / "checkpoints", directory)
    flipped = directory / "ckpt-60.data-00000-of-00001"
    content = bytearray(flipped.read_bytes())
    content[len(content) // 2] ^= 0xFF
    flipped.write_bytes(bytes(content))
    truncated = directory / "ckpt-40.data-00000-of-00001"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])

    located = inspection.locate(str(directory))
    problems = {info.step: info.problem for info in inspection.describe(located)}
    assert "Checksum does not match" in problems[60]
    assert problems[40] is not None
    assert problems[20] is None
    assert inspection.newest_intact(located).endswith("ckpt-20")


def test_variables_are_listed_by_group_with_shape_and_dtype(saved_run: Path) -> None:
    prefix = str(saved_run / "checkpoints" / "ckpt-60")
    variables = checkpoint_contents.read_variables(prefix)
    groups = {name: variable.group for name, variable in variables.items()}
    assert groups["model/dense_0/kernel"] == "model"
    assert groups["optimizer/iteration"] == "optimizer"
    assert groups["step"] == "training state"
    assert variables["model/dense_0/kernel"].shape == (64, 32)
    assert variables["step"].dtype == "int64"
    text = "\n".join(inspection.format_variables(prefix, variables))
    assert "model: 4 variables, 2,410 values" in text
    assert "optimizer: 9 variables" in text  # iteration + 2 slots per weight; the learning rate is config
    assert "training state: 5 variables" in text  # step, skipped_batches, rollbacks, skip_schedule, save_counter
    assert "provenance" not in text  # metadata, shown by format_provenance
    assert text.index("model/logits/kernel") < text.index("optimizer:") < text.index("optimizer/iteration")


def test_diff_shows_what_a_config_would_not_restore(saved_run: Path) -> None:
    prefix = str(saved_run / "checkpoints" / "ckpt-60")
    same = inspection.diff_against_config(prefix, TINY)
    assert all(difference.empty() for difference in same.values()), same

    wider = inspection.diff_against_config(prefix, [*TINY, "model.hidden=[16]"])
    assert [saved.name for saved, _ in wider["model"].mismatched] == ["model/dense_0/bias", "model/dense_0/kernel",
                                                                       "model/logits/kernel"]
    deeper = inspection.diff_against_config(prefix, [*TINY, "model.hidden=[32,8]"])
    assert [v.name for v in deeper["model"].missing] == ["model/dense_1/bias", "model/dense_1/kernel"]

    sgd = inspection.diff_against_config(prefix, [*TINY, "optimizer=sgd"])
    assert sgd["model"].empty()
    assert {v.name for v in sgd["optimizer"].unused} >= {"optimizer/dense_0_kernel_velocity"}
    text = "\n".join(inspection.format_difference(prefix, ["optimizer=sgd"], sgd))
    assert "resume with this config (train.py): would FAIL" in text
    assert "load() / init_from model weights: would restore" in text


def _inspect(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *arguments], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=120, env=subprocess_env())


def test_the_script_lists_and_shows_variables(saved_run: Path) -> None:
    result = _inspect(str(saved_run))
    assert_ok(result)
    lines = result.stdout.splitlines()
    assert lines[0] == f"checkpoints in {saved_run / 'checkpoints'} (run directory {saved_run})"
    assert [line.split()[1] for line in lines[1:4]] == ["60", "40", "20"]
    assert all(" intact " in line for line in lines[1:4])
    assert f"variables of {saved_run / 'checkpoints' / 'ckpt-60'}" in result.stdout
    assert "model/dense_0/kernel  [64, 32]" in result.stdout
    assert "provenance of ckpt-60:" in result.stdout and "TensorFlow 2." in result.stdout
    assert f"run record ({saved_run / 'run_record.json'}): attempt 1: 0 restarts" in result.stdout
    assert "completed: steps 0 -> 60" in result.stdout


@pytest.mark.parametrize(("override", "named"), [("model.nope=3", "'nope'"), ("model=nosuch", "model/nosuch"),
                                                 ("trainer.max_steps=abc", "trainer.max_steps")])
def test_diff_overrides_that_do_not_compose_are_a_one_line_error(saved_run: Path, override: str, named: str) -> None:
    result = _inspect(str(saved_run), "--diff", override)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"error: The overrides {override} do not compose" in result.stderr and named in result.stderr
    assert "Traceback" not in result.stderr
