"""Building the model named by `model._target_` from config.

Owns: the contract a model builder meets: a callable `build(*, input_shape, num_outputs, [seed],
**model_config) -> keras.Model`, where `num_outputs` is the width of the output layer the task asks
for (classes, target values, vocabulary). Builders written for classification only may call it
`num_classes`. Errors in the config (unknown builder, arguments it does not take) become
`ConfigError`s naming the key.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

import keras

from harness.errors import ConfigError

log = logging.getLogger(__name__)


def resolve_builder(target: str) -> Callable[..., keras.Model]:
    """Import `package.module.function` named by `model._target_`."""
    module_name, _, attribute = target.rpartition(".")
    try:
        builder = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(
            f"Config key 'model._target_' = {target!r} cannot be imported ({error}): expected "
            "'module.function', e.g. models.mlp.build_mlp, importable from the project directory."
        ) from None
    return builder


OUTPUT_WIDTH_ARGUMENTS = ("num_outputs", "num_classes")  # what a builder may call the output width


def build_model(model_config: dict[str, Any], *, input_shape: Sequence[int], num_outputs: int,
                seed: int) -> keras.Model:
    """Call the builder with the config's fields; build the model's variables. Call in `strategy.scope()`."""
    arguments = {k: v for k, v in model_config.items() if k != "_target_"}
    builder = resolve_builder(model_config["_target_"])
    parameters = inspect.signature(builder).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    unknown = sorted(k for k in arguments if k not in parameters and not accepts_any)
    if unknown:
        accepted = sorted(p for p in parameters if p not in ("input_shape", *OUTPUT_WIDTH_ARGUMENTS, "seed"))
        raise ConfigError(f"Config key 'model.{unknown[0]}' is not an argument of {model_config['_target_']} "
                          f"(it takes {accepted}).")
    if "seed" in parameters or accepts_any:
        arguments["seed"] = seed
    width_argument = next((name for name in OUTPUT_WIDTH_ARGUMENTS if name in parameters), "num_outputs")
    arguments[width_argument] = num_outputs
    model = builder(input_shape=tuple(input_shape), **arguments)
    if not model.built:
        model.build((None, *input_shape))
    log.info("model: %s, %d parameters", model.name, model.count_params())
    return model
