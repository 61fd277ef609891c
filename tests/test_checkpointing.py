"""Checkpoint integrity and mismatch diagnostics, through train.py as a restarted job sees them."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import assert_ok, checkpoint_values, run_train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 60-step run with ckpt-20, ckpt-40 and ckpt-60; tests work on copies."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    assert_ok(run_train(run_dir))
    return run_dir


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


def digests(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and "tensorboard" not in p.parts
            and ".hydra" not in p.parts and p.name != "train.log"}


def truncate_data(checkpoint: Path) -> None:
    data = checkpoint.with_name(checkpoint.name + ".data-00000-of-00001")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


def flip_bytes(checkpoint: Path) -> None:
    data = checkpoint.with_name(checkpoint.name + ".data-00000-of-00001")
    content = bytearray(data.read_bytes())
    middle = len(content) // 2
    content[middle: middle + 64] = bytes(255 - b for b in content[middle: middle + 64])
    data.write_bytes(bytes(content))


def drop_data(checkpoint: Path) -> None:  # what a kill between the two renames could leave
    checkpoint.with_name(checkpoint.name + ".data-00000-of-00001").unlink()


def garble_index(checkpoint: Path) -> None:
    checkpoint.with_name(checkpoint.name + ".index").write_bytes(b"\x00garbage" * 10)


@pytest.mark.parametrize("damage", [truncate_data, flip_bytes, drop_data, garble_index])
def test_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(
        run_copy: Path, damage: Callable[[Path], None]) -> None:
    checkpoints = run_copy / "checkpoints"
    damage(checkpoints / "ckpt-60")
    intact_before = digests(checkpoints)
    result = run_train(run_copy, "trainer.max_steps=80")
    assert_ok(result)
    assert "ckpt-60" in result.stdout + result.stderr and "trying an older one" in result.stdout + result.stderr
    assert "at step 40" in result.stdout
    # ckpt-40 was never touched; the rerun trained 40 -> 80 and rewrote 60 intact.
    assert digests(checkpoints)["ckpt-40.index"] == intact_before["ckpt-40.index"]
    assert checkpoint_values(checkpoints / "ckpt-80")["step/.ATTRIBUTES/VARIABLE_VALUE"] == 80
    assert checkpoint_values(checkpoints / "ckpt-60")["step/.ATTRIBUTES/VARIABLE_VALUE"] == 60


def test_garbled_state_file_does_not_lose_the_newest_checkpoint(run_copy: Path) -> None:
    (run_copy / "checkpoints" / "checkpoint").write_text("not a checkpoint state {{{")
    result = run_train(run_copy, "trainer.max_steps=80")
    assert_ok(result)
    assert "at step 60" in result.stdout


def test_all_checkpoints_unreadable_is_refused_without_touching_them(run_copy: Path) -> None:
    checkpoints = run_copy / "checkpoints"
    for step in (20, 40, 60):
        truncate_data(checkpoints / f"ckpt-{step}")
    before = digests(run_copy)
    result = run_train(run_copy, "trainer.max_steps=80")
    assert result.returncode == 2
    assert "Refusing to start over" in result.stderr and "ckpt-20" in result.stderr
    assert "Traceback" not in result.stderr
    assert digests(run_copy) == before


@pytest.mark.parametrize(
    ("overrides", "expected_lines"),
    [
        (("model.hidden=[48]",), ["model/dense_0/kernel: checkpoint [64, 32] float32 vs model [64, 48] float32",
                                  "model/logits/kernel: checkpoint [32, 10] float32 vs model [48, 10] float32"]),
        (("model.hidden=[32,32]",), ["only in the model", "model/dense_1/kernel"]),
        (("optimizer=sgd",), ["only in the checkpoint", "optimizer/dense_0_kernel_velocity"]),
    ],
)
def test_restoring_into_a_different_model_fails_with_a_report_and_changes_nothing(
        run_copy: Path, overrides: tuple[str, ...], expected_lines: list[str]) -> None:
    """The config change is allowed on purpose (resume.allow_config_change), so the provenance check
    (tests/test_operations.py) passes and the variable-level check is what refuses."""
    before = digests(run_copy)
    result = run_train(run_copy, *overrides, "trainer.max_steps=80", "resume.allow_config_change=[model.*,optimizer.*]")
    assert result.returncode == 2
    for line in expected_lines:
        assert line in result.stderr, result.stderr
    assert "same model/optimizer config" in result.stderr and "Nothing on disk was changed" in result.stderr
    assert "Traceback" not in result.stderr
    assert "step 70/80" not in result.stdout  # no training happened
    assert digests(run_copy) == before


def test_a_dead_workers_private_save_directory_is_removed_and_a_live_ones_kept(tmp_path: Path) -> None:
    """A non-chief SIGKILLed mid-save leaves a whole copy of the state in its private directory."""
    import subprocess
    import sys

    from harness.checkpoint.writing import remove_dead_workers_writes

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, live = (tmp_path / f"harness-worker-ckpt-{pid}-7f00" for pid in (int(finished.stdout), os.getpid()))
    for directory in (dead, live):
        (directory / "ckpt-50_temp").mkdir(parents=True)
    (tmp_path / "unrelated").mkdir()
    assert remove_dead_workers_writes(str(tmp_path)) == [str(dead)]
    assert not dead.exists() and live.exists() and (tmp_path / "unrelated").exists()
