"""A fault-tolerant training harness for TensorFlow 2 / Keras 3.

The pipeline (see train.py): config -> strategy -> model, optimizer, state -> attempt (lease,
crash-loop check) -> restore (provenance check) -> controller loop (rollbacks, watchdog) -> exit
code. One module per concern; importing this package is cheap (no TensorFlow import until a
module that needs it is imported).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.inference import LoadedModel


def load(run_dir: str, checkpoint: int | str | None = None) -> LoadedModel:
    """A run's model with a checkpoint's weights: `harness.inference.load` (imports TensorFlow on call)."""
    from harness.inference import load as load_run

    return load_run(run_dir, checkpoint)
