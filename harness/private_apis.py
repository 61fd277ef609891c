"""Every private TensorFlow / Keras API the harness relies on, in one place (checked on TF 2.21,
Keras 3.15). Each has no public equivalent; when an upgrade breaks one, this module is the one to
fix, and tests/test_state.py, test_distributed.py and test_checkpoint_io.py are the ones that fail.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import keras
import tensorflow as tf


def nested_layers(model: keras.Model, *, include_self: bool) -> list[keras.layers.Layer]:
    """Every layer inside `model`, nested models' layers included (Keras's `_flatten_layers`)."""
    return list(model._flatten_layers(include_self=include_self))


def layer_seed_generators(layer: keras.layers.Layer) -> list[keras.random.SeedGenerator]:
    """The RNGs a layer owns (dropout & co): their state is not tracked by `tf.train.Checkpoint`."""
    return list(getattr(layer, "_seed_generators", []))


def configure_coordination_service(*, leader: str, jobs: dict[str, int], heartbeat_timeout_seconds: int,
                                   shutdown_barrier_seconds: int) -> None:
    """Configure TF's coordination service as MultiWorkerMirroredStrategy would, with our timeouts.

    The strategy configures the service itself (with a 10 s heartbeat) only if nothing configured it
    before, so this call wins. A task missing heartbeats for the timeout is reported to all others,
    whose in-flight and later collectives then fail with UNAVAILABLE.
    """
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.eager import context

    context.context().configure_coordination_service(
        service_type="standalone",
        service_leader=leader,
        heartbeat_timeout_in_ms=heartbeat_timeout_seconds * 1000,
        shutdown_barrier_timeout_in_ms=shutdown_barrier_seconds * 1000,
        coordinated_jobs=[coordination_config_pb2.CoordinatedJob(name=job, num_tasks=count)
                          for job, count in jobs.items()],
    )


def raise_pending_async_write_error(checkpoint: tf.train.Checkpoint) -> None:
    """Raise the error of the background write `sync()` just waited for, if it failed.

    TensorFlow keeps it to raise at the start of the *next* save (async_checkpoint_helper's
    `_check_async_thread_error`), where it would be blamed on the wrong checkpoint.
    """
    helper: Any = getattr(checkpoint, "_async_checkpointer_impl", None)
    if helper is not None and hasattr(helper, "_check_async_thread_error"):
        helper._check_async_thread_error()


@contextlib.contextmanager
def assignments_without_shape_check(variables: Sequence[tf.Variable]) -> Iterator[None]:
    """`tf.Variable.assign` on these variables skips its run-time check that the value has the variable's *current*
    shape (the static shape is still checked). `tf.distribute` variables restore every device's copy through
    `assign`, which would refuse the checkpoint's value for a copy whose buffer was released (an empty tensor)."""
    flags = [variable._validate_shape for variable in variables]
    for variable in variables:
        variable._validate_shape = False
    try:
        yield
    finally:
        for variable, flag in zip(variables, flags):
            variable._validate_shape = flag


def is_packed(variable: tf.distribute.DistributedValues) -> bool:
    """A packed distributed variable (TPUs) assigns through one handle for all devices, not its per-device copies."""
    return getattr(variable, "_packed_variable", None) is not None
