"""Examining checkpoints without training: where they are, whether they are intact, what they hold.

Owns: turning a user-given path (a run directory, a checkpoint directory or one checkpoint's prefix)
into checkpoints; the intact check (every tensor read back, so TensorFlow verifies each one's
checksum); the variable table of a checkpoint, grouped model / optimizer / training state; its
provenance record and the run's restart record, for people; and the
comparison of a checkpoint with the variables of a model (and optimizer) built from a config: what
would not restore. Nothing here writes to the checkpoint directory. `scripts/inspect_checkpoint.py`
is the command line over this module; `harness/results/inference.py` and `harness/training/warm_start.py` use its
locating and comparing.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import tensorflow as tf

from harness.checkpoint.checkpointer import CHECKPOINT_NAME, list_checkpoints
from harness.errors import CheckpointError
from harness.operations import run_dir as run_files

log = logging.getLogger(__name__)

_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"  # object-based checkpoints append it to every variable's key
_OBJECT_GRAPH = "_CHECKPOINTABLE_OBJECT_GRAPH"
GROUPS = ("model", "optimizer", "training state")


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


def is_prefix(path: str) -> bool:
    """True if `path` is a checkpoint prefix (its `.index` file exists)."""
    return tf.io.gfile.exists(f"{path}.index")


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
        return Located(directory, _checkpoints_in(directory) or [(_step_of(path), path)], path, None)
    if not tf.io.gfile.isdir(path):
        problem = "is a file but no checkpoint" if tf.io.gfile.exists(path) else "does not exist"
        raise CheckpointError(f"'{path}' {problem}: expected a run directory, a checkpoint directory or a "
                              f"checkpoint prefix such as <dir>/{CHECKPOINT_NAME}-1000 (whose .index file exists).")
    record = run_files.read_config_record(path)
    if record is not None:
        directory = checkpoint_dir_of_run(path, record)
        return Located(directory, _checkpoints_in(directory), None, path)
    return Located(path, _checkpoints_in(path), None, None)


def checkpoint_dir_of_run(run_dir: str, record: Mapping) -> str:
    """The run's `checkpoint.dir` from its config record, rebased onto `run_dir` if the run was moved."""
    recorded_run_dir = str(record.get("run_dir", ""))
    directory = str(record.get("checkpoint", {}).get("dir") or os.path.join(recorded_run_dir, "checkpoints"))
    if recorded_run_dir and (directory == recorded_run_dir or directory.startswith(recorded_run_dir.rstrip("/") + "/")):
        return os.path.join(run_dir, os.path.relpath(directory, recorded_run_dir))
    return directory


def _checkpoints_in(directory: str) -> list[tuple[int | None, str]]:
    """Harness checkpoints (`ckpt-<step>`), else whatever TensorFlow's `checkpoint` state file names."""
    found: list[tuple[int | None, str]] = list(list_checkpoints(directory))
    if not found:
        state = tf.train.get_checkpoint_state(directory)  # TF1 Saver / CheckpointManager state file
        if state is not None:
            prefixes = list(state.all_model_checkpoint_paths) or [state.model_checkpoint_path]
            for prefix in reversed(prefixes):
                prefix = prefix if os.path.isabs(prefix) else os.path.join(directory, prefix)
                if is_prefix(prefix):
                    found.append((_step_of(prefix), prefix))
    return found


def _step_of(prefix: str) -> int | None:
    tail = prefix.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


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


def verify(prefix: str) -> str | None:
    """Read every tensor of a checkpoint; return None if all are readable, else what went wrong.

    TensorFlow checks each tensor's CRC32C while reading, so a flipped byte, a truncated data
    file and a missing shard are all caught.
    """
    try:
        reader = tf.compat.v1.train.NewCheckpointReader(prefix)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except (tf.errors.OpError, ValueError, IndexError) as error:  # IndexError: a truncated data file
        return _first_line(error)
    return None


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


# ---------------------------------------------------------------------------------------------
# What a checkpoint holds
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variable:
    name: str  # as written by the harness: model/<layer>/<weight>, optimizer/<slot>, step
    shape: tuple[int, ...]
    dtype: str

    @property
    def group(self) -> str:
        head = self.name.split("/", 1)[0]
        if head == "provenance":
            return "provenance"  # metadata (harness/checkpoint/provenance.py), not training state
        return head if head in ("model", "optimizer") else "training state"


def read_variables(prefix: str) -> dict[str, Variable]:
    """Every variable of a checkpoint by name (object-graph bookkeeping and suffixes removed).

    Name-based TF1 checkpoints have no groups; their names are returned as written.
    """
    try:
        reader = tf.compat.v1.train.NewCheckpointReader(prefix)
    except (tf.errors.OpError, ValueError) as error:
        raise CheckpointError(f"Checkpoint '{prefix}' cannot be read: {_first_line(error)}") from None
    shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    found = {}
    for key, shape in shapes.items():
        if key == _OBJECT_GRAPH:
            continue
        name = key[: -len(_SUFFIX)] if key.endswith(_SUFFIX) else key
        found[name] = Variable(name, tuple(shape), dtypes[key].name)
    return found


def is_object_based(prefix: str) -> bool:
    """True for TF2 `tf.train.Checkpoint` checkpoints (the harness's), False for TF1 name-based ones."""
    return tf.compat.v1.train.NewCheckpointReader(prefix).has_tensor(_OBJECT_GRAPH)


def expected_variables(items: Mapping[str, object]) -> dict[str, Variable]:
    """The variables a `tf.train.Checkpoint(**items)` would write, from a write to memory (not disk)."""
    checkpoint = tf.train.Checkpoint(**items)
    probe = f"ram://harness-inspection-{id(checkpoint)}/{CHECKPOINT_NAME}"
    try:
        return read_variables(checkpoint.write(probe))
    finally:
        tf.io.gfile.rmtree(os.path.dirname(probe))


# ---------------------------------------------------------------------------------------------
# What would not restore
# ---------------------------------------------------------------------------------------------
@dataclass
class Difference:
    """How a checkpoint's variables differ from the ones a model (and optimizer) expects."""

    mismatched: list[tuple[Variable, Variable]] = field(default_factory=list)  # (checkpoint, expected)
    missing: list[Variable] = field(default_factory=list)  # expected, absent from the checkpoint
    unused: list[Variable] = field(default_factory=list)  # in the checkpoint, expected by nothing

    def empty(self) -> bool:
        return not (self.mismatched or self.missing or self.unused)

    def lines(self, *, limit: int = 20) -> list[str]:
        """Human-readable lines, at most `limit` per kind."""
        out = []
        for saved, wanted in self.mismatched[:limit]:
            out.append(f"  {saved.name}: checkpoint {list(saved.shape)} {saved.dtype} vs model "
                       f"{list(wanted.shape)} {wanted.dtype}")
        for title, variables in (("only in the model", self.missing), ("only in the checkpoint", self.unused)):
            if variables:
                shown = ", ".join(f"{v.name} {list(v.shape)}" for v in variables[:limit])
                out.append(f"  {title}, {len(variables)}: {shown}" + (" ..." if len(variables) > limit else ""))
        return out


def compare(saved: Mapping[str, Variable], expected: Mapping[str, Variable], *,
            groups: Sequence[str] = GROUPS) -> Difference:
    """Compare the variables of `groups` by name, shape and dtype (TensorFlow's `save_counter` aside)."""
    saved = {n: v for n, v in saved.items() if v.group in groups and n != "save_counter"}
    expected = {n: v for n, v in expected.items() if v.group in groups and n != "save_counter"}
    difference = Difference()
    for name in sorted(saved.keys() & expected.keys()):
        if (saved[name].shape, saved[name].dtype) != (expected[name].shape, expected[name].dtype):
            difference.mismatched.append((saved[name], expected[name]))
    difference.missing = [expected[n] for n in sorted(expected.keys() - saved.keys())]
    difference.unused = [saved[n] for n in sorted(saved.keys() - expected.keys())]
    return difference


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
    from harness.checkpoint.checkpointer import read_provenance

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


def _first_line(error: BaseException) -> str:
    text = getattr(error, "message", None) or str(error)
    return (text.strip().splitlines() or [type(error).__name__])[0][:300]
