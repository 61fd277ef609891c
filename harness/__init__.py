"""A fault-tolerant training harness for TensorFlow 2 / Keras 3.

The pipeline (see train.py): config -> strategy -> model, optimizer, state -> attempt (lease,
crash-loop check) -> restore (provenance check) -> controller loop (rollbacks, watchdog) -> exit
code. One module per concern; importing this package is cheap (no TensorFlow import until a
module that needs it is imported).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.results.inference import LoadedModel

# The checkout train.py runs from: conf/ and models/ are found, and its version recorded, relative to it.
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(run_dir: str, checkpoint: int | str | None = None) -> LoadedModel:
    """A run's model with a checkpoint's weights: `harness.results.inference.load` (imports TensorFlow on call)."""
    from harness.results.inference import load as load_run

    return load_run(run_dir, checkpoint)
