"""Tasks: what is learned from the data, as one seam between the data, the model and the trainer.

Owns: everything that depends on the kind of problem (the shape and kind of targets, the
per-example loss, the metrics, what the model signature records, what inference and export
return). The trainer, controller, checkpointing, rollback and export code call a `Task` and know
nothing about any particular one. Shipped: `classification` (default), `regression`,
`language_model`; a user task is any `Task` subclass named by `task._target_` (README, "Tasks").
"""

from __future__ import annotations

from harness.tasks.base import Task, build_task, check_model_fits

__all__ = ["Task", "build_task", "check_model_fits"]
