"""Config provenance: what produced a checkpoint, and which config changes a resume may make.

Owns: the provenance record stored inside every checkpoint (the resolved config, the
command-line overrides, the harness version (git commit when available), TensorFlow, Keras and
Python versions) and the rules that compare it with the config of a run that resumes from it.
Guarantees:
- A resumed run whose config differs from its checkpoint's in a key that changes what is being
  trained (model, data, global batch, seed, optimizer and its hyperparameters, mixed precision)
  refuses to start with a `ConfigError` listing every such key with both values, before anything
  is written. `resume.allow_config_change=[key or glob, ...]` accepts such changes deliberately.
- Keys that only change how the run is driven (max_steps, intervals, paths, strategy, preemption,
  watchdog, export ...) may change freely. Every change, allowed or not, is logged.
- Keys not listed as free are guarded, so keys added to the schema later are safe by default.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import logging
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from harness import PROJECT_ROOT
from harness.errors import ConfigError

log = logging.getLogger(__name__)

# Keys that change how a run is driven but not what it trains (globs over dotted keys).
FREE_TO_CHANGE = (
    "experiment", "run_dir", "deterministic",
    "trainer.max_steps", "trainer.steps_per_loop", "trainer.log_every", "trainer.eval_every", "trainer.progress",
    "trainer.jit_compile", "trainer.intra_op_threads", "trainer.inter_op_threads", "trainer.loss_upper_bound",
    "trainer.max_rollbacks", "trainer.rollback_skip_batches", "trainer.max_crash_restarts",
    "data.prefetch", "data.eval_batch_size",
    "checkpoint.*", "preemption.*", "export.*", "lease.*", "watchdog.*", "resume.*", "strategy.*",
    "init_from", "init_from_skip", "init_from_name_map",  # warm start applies to fresh runs only
)
# Groups added to the schema after checkpoints were written without them: absent there means these
# values (checkpoints from before tasks existed trained a classification).
ABSENT_MEANS = {"task": {"task._target_": "harness.tasks.classification.Classification", "task.num_classes": None}}
# Compared only when the checkpoint recorded them: the data set's size (harness/training/assembly.py).
COMPARED_WHEN_RECORDED = ("data.records",)


@dataclass(frozen=True)
class ConfigChange:
    key: str  # dotted
    saved: Any  # value in the checkpoint's config (`<absent>` if the key did not exist)
    current: Any

    def describe(self) -> str:
        return f"{self.key}: {_show(self.saved)} -> {_show(self.current)}"


def build_provenance(resolved: dict[str, Any], *, overrides: tuple[str, ...]) -> dict[str, Any]:
    """The record saved with every checkpoint of this process."""
    import keras
    import tensorflow as tf

    return {
        "config": resolved,
        "overrides": list(overrides),
        "harness_version": harness_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "pid": os.getpid(),
        "written_by_process_started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def to_text(provenance: dict[str, Any]) -> str:
    return json.dumps(provenance, sort_keys=True, default=str)


def from_text(text: str | bytes) -> dict[str, Any]:
    return json.loads(text.decode() if isinstance(text, bytes) else text)


@functools.cache
def harness_version() -> str:
    """`git:<commit>[-dirty]` of the harness checkout, or `unknown` outside a git work tree."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"git:{commit}{'-dirty' if dirty else ''}"


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[ConfigChange]:
    """Every leaf key whose value differs between two resolved configs, sorted by key."""
    flat_saved, flat_current = _flatten(saved), _flatten(current)
    for group, values in ABSENT_MEANS.items():
        if group not in saved and group in current:
            flat_saved.update(values)
    unrecorded = [pattern for pattern in COMPARED_WHEN_RECORDED if not any(_matches(k, [pattern]) for k in flat_saved)]
    return [ConfigChange(key, flat_saved.get(key, _ABSENT), flat_current.get(key, _ABSENT))
            for key in sorted(flat_saved.keys() | flat_current.keys())
            if flat_saved.get(key, _ABSENT) != flat_current.get(key, _ABSENT) and not _matches(key, unrecorded)]


def check_resume(saved_provenance: dict[str, Any] | None, current: dict[str, Any], *, checkpoint: str,
                 allow: list[str]) -> list[ConfigChange]:
    """Refuse (`ConfigError`) a resume that changes guarded keys not in `allow`; log the rest.

    Returns the accepted changes. A checkpoint without a provenance record (written by another
    tool) is accepted with a warning: there is nothing to compare against.
    """
    if saved_provenance is None:
        log.warning("checkpoint %s records no config: cannot check that this run's config matches it", checkpoint)
        return []
    changes = config_changes(saved_provenance.get("config", {}), current)
    guarded = [c for c in changes if not _matches(c.key, FREE_TO_CHANGE)
               or (c.key == "trainer.max_steps" and _schedule_follows_max_steps(current))]
    refused = [c for c in guarded if not _matches(c.key, allow)]
    if refused:
        lines = [f"The config differs from the one checkpoint {checkpoint} was trained with, in keys that change what "
                 "is being trained, so resuming would silently mix two different runs:"]
        lines += [f"  {change.describe()}" for change in refused]
        if any(change.key == "trainer.max_steps" for change in refused):
            lines.append("  (optimizer.schedule.decay_steps is unset, so the cosine schedule is stretched over "
                         "trainer.max_steps: a new value changes the learning rate of every step from here on)")
        saved_overrides = " ".join(saved_provenance.get("overrides", [])) or "(none)"
        lines.append("Nothing the run saved was changed (checkpoints, config.yaml, run_record.json). Restore the "
                     f"original values (the checkpoint's command-line overrides were: {saved_overrides}), or start "
                     "a fresh run with another experiment=, or accept the change deliberately with "
                     "resume.allow_config_change=["
                     + ",".join(change.key for change in refused) + "].")
        raise ConfigError("\n".join(lines))
    for change in changes:
        log.info("config changed since the checkpoint: %s%s", change.describe(),
                 " (allowed by resume.allow_config_change)" if change in guarded else "")
    saved_version, current_version = saved_provenance.get("harness_version"), harness_version()
    if saved_version and saved_version != current_version:
        log.info("harness version changed since the checkpoint: %s -> %s", saved_version, current_version)
    return changes


def _schedule_follows_max_steps(config: dict[str, Any]) -> bool:
    """Whether the learning-rate curve is derived from trainer.max_steps (harness/training/optimization.py)."""
    schedule = config.get("optimizer", {}).get("schedule", {})
    return schedule.get("name") == "cosine" and not schedule.get("decay_steps")


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


_ABSENT = _Absent()


def _matches(key: str, patterns: tuple[str, ...] | list[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) or key.startswith(f"{pattern}.") for pattern in patterns)


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, _Absent) else json.dumps(value, default=str)
