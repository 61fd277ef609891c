"""Initialising a model's weights from another run or a foreign file (warm start, fine-tuning, import).

Owns: `init_from` and friends. Sources: a harness run directory (its newest intact checkpoint), a
checkpoint prefix (the harness's own object-based `tf.train.Checkpoint`s, or TF1 name-based ones
written by `tf.compat.v1.train.Saver`), and Keras weight files (`.weights.h5`, or `.keras`, whose
weights are read from inside the archive). Guarantees:
- Model weights only: optimizer slots, the step and anything else in the source are never read.
- Names: model variables are named as in harness checkpoints (`model/<layer>/<weight>`). By
  default a variable is looked up under the same name (object-based checkpoints), without the
  `model/` prefix (TF1: `dense_0/kernel`), or as `<layer name>/<index>` (Keras files, where
  `<index>` is its position in the layer, as `layer.save_own_variables` numbers them).
  `name_map` entries, model variable or layer -> name in the source, override this; `skip` globs
  leave matching variables initialised.
- All or nothing: every name, shape and dtype is checked before the first variable is assigned.
  A model variable neither found nor skipped is an error (a `CheckpointError` listing them), never
  a silent re-initialisation; so is a skip pattern or name-map entry that matches nothing.
"""

from __future__ import annotations

import fnmatch
import io
import logging
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from harness.checkpoint.contents import KEY_SUFFIX, is_object_based, read_variables
from harness.errors import CheckpointError, ConfigError
from harness.private_apis import nested_layers
from harness.results import inspection
from harness.training.state import model_weights_tree

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelVariable:
    name: str  # model/<layer>/<weight>, as in harness checkpoints
    variable: tf.Variable
    owner: str | None  # the name of the layer that owns it
    index: int | None  # its position among the owner's variables (Keras weight files number them so)

    @property
    def layer(self) -> str:
        return self.name.rsplit("/", 1)[0]


def model_variables(model: keras.Model) -> list[ModelVariable]:
    """Every variable of `model`, named as harness checkpoints name them."""
    owners: dict[int, tuple[str, int]] = {}
    for layer in nested_layers(model, include_self=False):
        store: dict[str, object] = {}
        layer.save_own_variables(store)
        for index, value in store.items():
            owners.setdefault(id(value), (layer.name, int(index)))
    found = []
    for name, variable in _flatten(model_weights_tree(model), "model"):
        owner, index = owners.get(id(variable), (None, None))
        found.append(ModelVariable(name, variable, owner, index))
    return found


def _flatten(tree: Mapping[str, object], prefix: str) -> list[tuple[str, object]]:
    items = []
    for key, value in tree.items():
        if isinstance(value, Mapping):
            items.extend(_flatten(value, f"{prefix}/{key}"))
        else:
            items.append((f"{prefix}/{key}", value))
    return items


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------
class _CheckpointSource:
    """An object-based (TF2, the harness's) or name-based (TF1 Saver) checkpoint."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.object_based = is_object_based(prefix)
        self.kind = "checkpoint" if self.object_based else "TF1 name-based checkpoint"
        self.shapes = {name: v.shape for name, v in read_variables(prefix).items()}
        self._reader = tf.compat.v1.train.NewCheckpointReader(prefix)

    def default_name(self, variable: ModelVariable) -> str:
        return variable.name if self.object_based else variable.name.removeprefix("model/")

    def name_in_layer(self, layer: str, variable: ModelVariable) -> str:
        return f"{layer}/{variable.name.rsplit('/', 1)[1]}"

    def candidates(self) -> list[str]:
        """Names a model variable could come from (for the report of unused ones)."""
        if self.object_based:
            return [name for name in self.shapes if name.startswith("model/")]
        return list(self.shapes)

    def read(self, name: str) -> np.ndarray:
        key = name + KEY_SUFFIX if self.object_based else name
        return np.asarray(self._reader.get_tensor(key))


class _KerasWeightsSource:
    """A Keras 3 `.weights.h5` file (or the weights inside a `.keras` archive)."""

    def __init__(self, path: str) -> None:
        import h5py

        self.prefix = path
        self.kind = "Keras weights file"
        with tf.io.gfile.GFile(path, "rb") as handle:
            content = handle.read()
        try:
            if path.endswith(".keras"):
                with zipfile.ZipFile(io.BytesIO(content)) as archive:
                    content = archive.read("model.weights.h5")
            self._arrays: dict[str, np.ndarray] = {}
            with h5py.File(io.BytesIO(content), "r") as weights:
                groups: list[tuple[str, h5py.Group]] = []

                def collect(path: str, item: object) -> None:  # Keras keeps a layer's weights in <path>/vars
                    if isinstance(item, h5py.Group) and path.rsplit("/", 1)[-1] == "vars":
                        groups.append((path, item))

                weights.visititems(collect)
                layer_names = [str(group.attrs.get("name", path)) for path, group in groups]
                for (path, group), layer in zip(groups, layer_names):
                    layer = layer if layer_names.count(layer) == 1 else path  # ambiguous names: the h5 path
                    for index in group:
                        self._arrays[f"{layer}/{index}"] = np.asarray(group[index])
        except (OSError, KeyError, zipfile.BadZipFile) as error:
            raise CheckpointError(f"init_from = '{path}' is not a readable Keras weights file ({error}): expected a "
                                  ".weights.h5 file written by model.save_weights, or a .keras file.") from None
        self.shapes = {name: tuple(array.shape) for name, array in self._arrays.items()}

    def default_name(self, variable: ModelVariable) -> str:
        return f"{variable.owner}/{variable.index}"

    def name_in_layer(self, layer: str, variable: ModelVariable) -> str:
        return f"{layer}/{variable.index}"

    def candidates(self) -> list[str]:
        return list(self.shapes)

    def read(self, name: str) -> np.ndarray:
        return self._arrays[name]


def open_source(path: str) -> _CheckpointSource | _KerasWeightsSource:
    """The weights `init_from = path` names; see the module docstring for the kinds accepted."""
    if path.endswith((".h5", ".keras")):
        if not tf.io.gfile.exists(path):
            raise ConfigError(f"Config key 'init_from' = '{path}': no such file.")
        return _KerasWeightsSource(path)
    try:
        located = inspection.locate(path)
    except CheckpointError as error:
        raise ConfigError(f"Config key 'init_from' = '{path}' is invalid: {error} Also accepted: a Keras "
                          ".weights.h5 or .keras file.") from None
    try:
        return _CheckpointSource(inspection.intact_checkpoint(located))
    except CheckpointError as error:
        raise CheckpointError(f"init_from = '{path}': {error}") from None


# ---------------------------------------------------------------------------------------------
# Matching and assigning
# ---------------------------------------------------------------------------------------------
@dataclass
class WarmStartReport:
    """What `init_model_weights` did."""

    source: str  # the checkpoint prefix or file read
    kind: str
    restored: list[tuple[str, str]] = field(default_factory=list)  # (model variable, name in the source)
    left_initialised: list[str] = field(default_factory=list)  # model variables matched by `skip`
    unused: list[str] = field(default_factory=list)  # source names no model variable took

    def lines(self, *, limit: int = 50) -> list[str]:
        total = len(self.restored) + len(self.left_initialised)
        out = [f"warm start from {self.kind} {self.source}: restored {len(self.restored)} of {total} model "
               "variables (optimizer fresh, step 0)"]
        for name, source_name in self.restored[:limit]:
            out.append(f"  restored {name}" + ("" if source_name == name else f" <- {source_name}"))
        if len(self.restored) > limit:
            out.append(f"  ... and {len(self.restored) - limit} more")
        if self.left_initialised:
            out.append(f"  left initialised ({len(self.left_initialised)}, init_from_skip): "
                       + ", ".join(self.left_initialised[:limit]))
        if self.unused:
            out.append(f"  not used from the source ({len(self.unused)}): " + ", ".join(self.unused[:limit])
                       + (" ..." if len(self.unused) > limit else ""))
        return out


def init_model_weights(model: keras.Model, path: str, *, skip: Sequence[str] = (),
                       name_map: Mapping[str, str] | None = None) -> WarmStartReport:
    """Assign `model`'s variables from the weights at `path`; return what was restored and left initialised.

    `skip`: fnmatch globs over model variable names (`model/logits/*`). `name_map`: model variable
    (`model/dense_0/kernel`) or layer (`model/dense_0`) -> its name in the source; for Keras weight
    files a layer maps to a layer name and the variable keeps its index. Raises `ConfigError` for a
    bad path, pattern or map entry and `CheckpointError` if the weights do not fit; in both cases
    before any variable changes.
    """
    name_map = dict(name_map or {})
    source = open_source(path)
    variables = model_variables(model)
    names = [v.name for v in variables]
    layers = {v.layer for v in variables}
    for pattern in skip:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise ConfigError(f"Config key 'init_from_skip' has the pattern '{pattern}', which matches no model "
                              f"variable; the model has {_shortlist(names)}.")
    for key in name_map:
        if key not in names and key not in layers:
            raise ConfigError(f"Config key 'init_from_name_map' has the entry '{key}', which is neither a model "
                              f"variable nor a layer; the model has {_shortlist(names)}.")
    report = WarmStartReport(source=source.prefix, kind=source.kind)
    assignments: list[tuple[ModelVariable, str]] = []
    missing, mismatched = [], []
    for variable in variables:
        if any(fnmatch.fnmatchcase(variable.name, pattern) for pattern in skip):
            report.left_initialised.append(variable.name)
            continue
        source_name = _source_name(variable, source, name_map)
        wanted = tuple(variable.variable.shape)
        if source_name not in source.shapes:
            missing.append(f"{variable.name} (looked up as '{source_name}')")
        elif tuple(source.shapes[source_name]) != wanted:
            mismatched.append(f"{variable.name} {list(wanted)} vs '{source_name}' {list(source.shapes[source_name])}")
        else:
            assignments.append((variable, source_name))
    used = {source_name for _, source_name in assignments}
    report.unused = sorted(name for name in source.candidates() if name not in used)
    if missing or mismatched:
        lines = [f"init_from = '{path}' ({source.kind} {source.prefix}) does not fit the model:"]
        if mismatched:
            lines.append(f"  different shapes ({len(mismatched)}): " + "; ".join(mismatched[:20]))
        if missing:
            lines.append(f"  not in the source ({len(missing)}): " + "; ".join(missing[:20]))
        lines.append(f"  names in the source not used ({len(report.unused)}): {_shortlist(report.unused)}")
        lines.append("Nothing was assigned. Leave such variables initialised with init_from_skip=[<glob>, ...], or "
                     "give their names in the source with init_from_name_map={<model variable or layer>: <name>}. "
                     "scripts/inspect_checkpoint.py lists a checkpoint's names.")
        raise CheckpointError("\n".join(lines))
    values = []
    for variable, source_name in assignments:
        value = source.read(source_name)
        target = np.dtype(tf.as_dtype(variable.variable.dtype).as_numpy_dtype)
        if value.dtype != target and not (value.dtype.kind == "f" and target.kind == "f"):
            raise CheckpointError(f"init_from: '{source_name}' in {source.prefix} holds {value.dtype} values but "
                                  f"{variable.name} is {target}.")
        values.append(value.astype(target, copy=False))
    for (variable, source_name), value in zip(assignments, values):
        variable.variable.assign(value)
        report.restored.append((variable.name, source_name))
    return report


def _source_name(variable: ModelVariable, source: _CheckpointSource | _KerasWeightsSource,
                 name_map: Mapping[str, str]) -> str:
    if variable.name in name_map:
        return name_map[variable.name]
    if variable.layer in name_map:
        return source.name_in_layer(name_map[variable.layer], variable)
    return source.default_name(variable)


def _shortlist(names: Sequence[str], limit: int = 12) -> str:
    return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "") if names else "none"


def warm_start_fresh_run(model: keras.Model, *, init_from: str | None, skip: Sequence[str],
                         name_map: Mapping[str, str], resumed_step: int | None) -> WarmStartReport | None:
    """train.py's hook: initialise a fresh run from `init_from` and log the report.

    A run that resumed from its own checkpoint (`resumed_step` not None) keeps its weights:
    resuming beats warm-starting, so restarting a warm-started run continues it.
    """
    if init_from is None:
        return None
    if resumed_step is not None:
        log.info("init_from = %s ignored: the run resumed from its own checkpoint at step %d", init_from, resumed_step)
        return None
    report = init_model_weights(model, init_from, skip=skip, name_map=name_map)
    for line in report.lines():
        log.info(line)
    return report
