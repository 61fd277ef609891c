"""What a checkpoint holds: its variables by name, shape and dtype, its provenance record, and how
they differ from what a model and optimizer expect.

One implementation for training (the mismatch report when a restore does not fit), inspection
(`scripts/inspect_checkpoint.py`), `harness.load` and warm starts. Names are the harness's keys
(`model/<layer>/<weight>`, `optimizer/<slot>`, `step`) without TensorFlow's object-graph suffix.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import tensorflow as tf

from harness.checkpoint.files import CHECKPOINT_NAME, READ_ERRORS
from harness.checkpoint.provenance import from_text
from harness.errors import CheckpointError, error_summary

KEY_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"  # object-based checkpoints append it to every variable's key
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
PROVENANCE_KEY = "provenance" + KEY_SUFFIX  # not training state: which config and versions wrote the checkpoint
GROUPS = ("model", "optimizer", "training state")


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
    except (*READ_ERRORS, ValueError) as error:
        raise CheckpointError(f"Checkpoint '{prefix}' cannot be read: {error_summary(error)}") from None
    shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    found = {}
    for key, shape in shapes.items():
        if key == OBJECT_GRAPH_KEY:
            continue
        name = key[: -len(KEY_SUFFIX)] if key.endswith(KEY_SUFFIX) else key
        found[name] = Variable(name, tuple(shape), dtypes[key].name)
    return found


def is_object_based(prefix: str) -> bool:
    """True for TF2 `tf.train.Checkpoint` checkpoints (the harness's), False for TF1 name-based ones."""
    return tf.compat.v1.train.NewCheckpointReader(prefix).has_tensor(OBJECT_GRAPH_KEY)


def expected_variables(items: Mapping[str, object]) -> dict[str, Variable]:
    """The variables a `tf.train.Checkpoint(**items)` would write, from a write to memory (not disk)."""
    checkpoint = tf.train.Checkpoint(**items)
    probe = f"ram://harness-inspection-{id(checkpoint)}/{CHECKPOINT_NAME}"
    try:
        return read_variables(checkpoint.write(probe))
    finally:
        tf.io.gfile.rmtree(os.path.dirname(probe))


def read_provenance(path: str) -> dict[str, Any] | None:
    """The provenance record inside a checkpoint, or None if it has none (or it is unreadable)."""
    try:
        reader = tf.compat.v1.train.NewCheckpointReader(path)
        if not reader.has_tensor(PROVENANCE_KEY):
            return None
        return from_text(reader.get_tensor(PROVENANCE_KEY)) or None  # "{}": saved through the API, no record
    except (*READ_ERRORS, ValueError):
        return None


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
