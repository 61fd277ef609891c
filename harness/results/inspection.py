"""Examining checkpoints without training: where they are, whether they are intact, what they hold.

Owns: turning a user-given path (a run directory, a checkpoint directory or one checkpoint's prefix)
into checkpoints and choosing the newest intact one; the listing with sizes and intactness; the
variable table, provenance and restart record, formatted for people; and `diff_against_config`:
what of a checkpoint would not restore into the model and optimizer a config builds. Reading and
comparing variables is `harness/checkpoint/contents.py`'s. Nothing here writes to the checkpoint
directory. `scripts/inspect_checkpoint.py` is the command line over this module;
`harness/results/inference.py` and `harness/results/warm_start.py` use its locating.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import tensorflow as tf

from harness.checkpoint.contents import (
    GROUPS,
    Difference,
    Variable,
    compare,
    expected_variables,
    is_object_based,
    read_variables,
)
from harness.checkpoint.files import CHECKPOINT_NAME, checkpoints_in, is_prefix, step_of, verify
from harness.errors import CheckpointError
from harness.operations import run_dir as run_files

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Locating checkpoints
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Located:
    """What a user-given path names: a directory of checkpoints and, for a prefix, that one checkpoint."""

    directory: str  # where the checkpoints are
    checkpoints: list[tuple[int | None, str]]  # (step, prefix), newest first; step None if not ckpt-<step>
    chosen: str | None  # the prefix the path named explicitly, else None
    run_dir: str | None  # set when the path was a run directory


def locate(path: str) -> Located:
    """Resolve a run directory, a checkpoint directory or a checkpoint prefix (with or without `.index`).

    A run directory's checkpoints are found through the `checkpoint.dir` its config.yaml records
    (rebased if the run directory was moved). Raises `CheckpointError` naming the path if it is
    none of these.
    """
    path = path.rstrip("/") or "/"
    if path.endswith(".index") and tf.io.gfile.exists(path):
        path = path[: -len(".index")]
    if is_prefix(path):
        directory = os.path.dirname(path) or "."
        return Located(directory, checkpoints_in(directory) or [(step_of(path), path)], path, None)
    if not tf.io.gfile.isdir(path):
        problem = "is a file but no checkpoint" if tf.io.gfile.exists(path) else "does not exist"
        raise CheckpointError(f"'{path}' {problem}: expected a run directory, a checkpoint directory or a "
                              f"checkpoint prefix such as <dir>/{CHECKPOINT_NAME}-1000 (whose .index file exists).")
    record = run_files.read_config_record(path)
    if record is not None:
        directory = checkpoint_dir_of_run(path, record)
        return Located(directory, checkpoints_in(directory), None, path)
    return Located(path, checkpoints_in(path), None, None)


def checkpoint_dir_of_run(run_dir: str, record: Mapping) -> str:
    """The run's `checkpoint.dir` from its config record, rebased onto `run_dir` if the run was moved."""
    recorded_run_dir = str(record.get("run_dir", ""))
    directory = str(record.get("checkpoint", {}).get("dir") or os.path.join(recorded_run_dir, "checkpoints"))
    if recorded_run_dir and (directory == recorded_run_dir or directory.startswith(recorded_run_dir.rstrip("/") + "/")):
        return os.path.join(run_dir, os.path.relpath(directory, recorded_run_dir))
    return directory


# ---------------------------------------------------------------------------------------------
# Intactness and the list of checkpoints
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointInfo:
    step: int | None
    prefix: str
    modified: datetime.datetime | None  # the index file's modification time (local time)
    size_bytes: int  # index + data shards
    problem: str | None  # None = intact: every tensor was read and its checksum verified

    @property
    def intact(self) -> bool:
        return self.problem is None


def describe(located: Located) -> list[CheckpointInfo]:
    """Step, time, size and intactness of every located checkpoint, newest first (reads every tensor)."""
    infos = []
    for step, prefix in located.checkpoints:
        files = tf.io.gfile.glob(f"{prefix}.index") + tf.io.gfile.glob(f"{prefix}.data-*")
        stats = [tf.io.gfile.stat(name) for name in files]
        index = [stat for name, stat in zip(files, stats) if name.endswith(".index")]
        modified = datetime.datetime.fromtimestamp(index[0].mtime_nsec / 1e9) if index else None
        infos.append(CheckpointInfo(step, prefix, modified, sum(stat.length for stat in stats), verify(prefix)))
    return infos


def newest_intact(located: Located) -> str:
    """The named checkpoint if the path named one, else the newest intact one (older ones are the fallback)."""
    if located.chosen is not None:
        return located.chosen
    if not located.checkpoints:
        raise CheckpointError(f"No checkpoints in '{located.directory}': expected files {CHECKPOINT_NAME}-<step>.index "
                              "(a run writes its first one after checkpoint.every_steps steps).")
    for _, prefix in located.checkpoints:
        problem = verify(prefix)
        if problem is None:
            return prefix
        log.warning("checkpoint %s is not intact (%s); trying an older one", prefix, problem)
    raise CheckpointError(f"None of the {len(located.checkpoints)} checkpoints in '{located.directory}' is intact "
                          f"({', '.join(os.path.basename(p) for _, p in located.checkpoints)}).")


def select(located: Located, step: int | None) -> str:
    """The checkpoint of `step` (None: the named or newest intact one)."""
    if step is None:
        return newest_intact(located)
    for found_step, prefix in located.checkpoints:
        if found_step == step:
            return prefix
    steps = [s for s, _ in located.checkpoints]
    raise CheckpointError(f"No checkpoint at step {step} in '{located.directory}': it holds steps {steps}.")


def intact_checkpoint(located: Located, step: int | None = None) -> str:
    """The checkpoint to read weights from: the one the path (or `step`) names, which must be intact,
    else the newest intact one, older ones being the fallback. `CheckpointError` says which and why."""
    if step is None and located.chosen is None:
        return newest_intact(located)
    prefix = select(located, step)
    problem = verify(prefix)
    if problem is not None:
        raise CheckpointError(f"Checkpoint '{prefix}' is not intact ({problem}); choose another one "
                              "(scripts/inspect_checkpoint.py lists them).")
    return prefix


# ---------------------------------------------------------------------------------------------
# What a checkpoint holds
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# What would not restore
# ---------------------------------------------------------------------------------------------


def diff_against_config(prefix: str, overrides: Sequence[str]) -> dict[str, Difference]:
    """Per group, what would not restore into the model and optimizer `train.py OVERRIDES` would build.

    The config is composed from conf/ exactly as `python train.py OVERRIDES` composes it (the
    input shape comes from the configured data source). Raises `HarnessError`s for a bad config.
    """
    from harness import runtime
    from harness.config import composition, run_config
    from harness.training import assembly

    run = run_config.to_typed_config(composition.compose(overrides))
    runtime.configure_runtime(seed=run.seed, deterministic=False, mixed_precision=run.trainer.mixed_precision)
    train_state = assembly.build_train_state(run, assembly.load_task_data(run))
    expected = expected_variables(train_state.checkpoint_items())
    saved = read_variables(prefix)
    return {group: compare(saved, expected, groups=[group]) for group in GROUPS}


# ---------------------------------------------------------------------------------------------
# Text for the command line
# ---------------------------------------------------------------------------------------------
def format_listing(located: Located, infos: Sequence[CheckpointInfo]) -> list[str]:
    lines = [f"checkpoints in {located.directory}" + (f" (run directory {located.run_dir})" if located.run_dir else "")]
    if not infos:
        lines.append("  none")
    for info in infos:
        when = info.modified.strftime("%Y-%m-%d %H:%M:%S") if info.modified else "?"
        state = "intact" if info.intact else f"NOT INTACT: {info.problem}"
        step = "?" if info.step is None else str(info.step)
        lines.append(f"  step {step:>8}  {when}  {_size(info.size_bytes):>9}  {state}  {os.path.basename(info.prefix)}")
    return lines


def format_variables(prefix: str, variables: Mapping[str, Variable]) -> list[str]:
    object_based = is_object_based(prefix)
    lines = [f"variables of {prefix}" + ("" if object_based else " (name-based TF1 checkpoint)")]
    groups = GROUPS if object_based else ("variables",)
    for group in groups:
        members = [v for v in variables.values() if not object_based or v.group == group]
        count = sum(_count(v.shape) for v in members)
        lines.append(f"{group}: {len(members)} variables, {count:,} values")
        width = max((len(v.name) for v in members), default=0)
        for v in sorted(members, key=lambda v: v.name):
            lines.append(f"  {v.name:<{width}}  {list(v.shape)!s:<14} {v.dtype}")
    return lines


def format_difference(prefix: str, overrides: Sequence[str], differences: Mapping[str, Difference]) -> list[str]:
    command = "python train.py " + " ".join(overrides) if overrides else "python train.py"
    lines = [f"{prefix} compared with the model and optimizer `{command}` builds:"]
    for group, difference in differences.items():
        lines.append(f"{group}: " + ("matches" if difference.empty() else "differs"))
        lines.extend(difference.lines())
    model_ok = differences["model"].empty()
    resume_ok = all(d.empty() for d in differences.values())
    lines.append(f"resume with this config (train.py): {'would restore' if resume_ok else 'would FAIL'}")
    lines.append(f"load() / init_from model weights: {'would restore' if model_ok else 'would FAIL'}")
    return lines


def format_provenance(prefix: str) -> list[str]:
    """What wrote the checkpoint: versions, command-line overrides and a few key settings."""
    from harness.checkpoint.contents import read_provenance

    record = read_provenance(prefix)
    if record is None:
        return [f"provenance of {os.path.basename(prefix)}: none recorded (not written by this harness's train.py)"]
    config = record.get("config", {})
    return [
        f"provenance of {os.path.basename(prefix)}:",
        f"  harness {record.get('harness_version')}, TensorFlow {record.get('tensorflow')}, "
        f"Keras {record.get('keras')}, Python {record.get('python')}, host {record.get('host')}",
        f"  overrides: {' '.join(record.get('overrides', [])) or '(none)'}",
        f"  model {config.get('model', {}).get('_target_')}, data {config.get('data', {}).get('name')}, "
        f"optimizer {config.get('optimizer', {}).get('name')}, seed {config.get('seed')}",
    ]


def format_run_record(run_dir: str) -> list[str]:
    """The restart accounting of a run directory (harness/operations/run_record.py)."""
    from harness.operations.run_record import read_record, record_path

    record = read_record(run_dir)
    if record is None:
        return [f"run record: none in {run_dir}"]
    lines = [f"run record ({record_path(run_dir)}): {record.summary()}"]
    if record.consecutive_crashes:
        lines.append(f"  {record.consecutive_crashes} crashes in a row at step {record.crash_step}")
    if record.current:
        lines.append(f"  in progress (or killed): pid {record.current.get('pid')} on {record.current.get('host')}, "
                     f"step {record.current.get('step')}")
    for attempt in record.history[-5:]:
        lines.append(f"  {attempt.get('outcome'):>16}: steps {attempt.get('start_step')} -> {attempt.get('end_step')}, "
                     f"pid {attempt.get('pid')} on {attempt.get('host')}")
    return lines


def _count(shape: Sequence[int]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


def _size(num_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return ""
