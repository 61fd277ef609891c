"""The typed, validated configuration a run uses: `to_typed_config(cfg) -> RunConfig`.

Owns: turning Hydra's composed `DictConfig` into the schema's dataclasses (refusing keys the schema
lacks, which Hydra's `+key=` would add) and running every group's `validate`. `RunConfig` is the
schema's `Config` itself plus what only a running job knows; nothing else reads a raw `DictConfig`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness.config.schema import SCHEMAS_BY_GROUP, Config, _require
from harness.errors import ConfigError


@dataclass
class RunConfig(Config):
    """The validated configuration a run uses: every schema field as its dataclass, plus what a
    running job adds. `task` and `model` stay dicts: `_target_` plus the builder's arguments."""

    checkpoint_async: bool = False  # `checkpoint.async` in the config (a Python keyword)
    resolved: dict[str, Any] = field(default_factory=dict)  # the whole resolved config, for run_dir and hparams
    overrides: tuple[str, ...] = ()  # the command-line overrides, for provenance


_OPEN_GROUPS = ("task", "model")  # the schema of these depends on `_target_`: kept as dicts
_NAMED_GROUPS = ("data", "optimizer")  # the schema of these is chosen by their `name`


def to_typed_config(cfg: DictConfig) -> RunConfig:
    """Resolve and validate a composed config. Raises `ConfigError` naming the offending key."""
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as error:  # omegaconf raises several types, all naming the key
        raise ConfigError(f"The configuration does not resolve: {error}") from None
    assert isinstance(resolved, dict)
    values = dict(resolved)
    values["checkpoint"] = dict(resolved["checkpoint"])
    checkpoint_async = bool(values["checkpoint"].pop("async", False))
    _reject_unknown_keys(Config, {k: v for k, v in values.items() if k not in _OPEN_GROUPS + _NAMED_GROUPS},
                         prefix="")
    fields = {}
    for spec in dataclasses.fields(Config):
        value = values[spec.name]
        if spec.name in _OPEN_GROUPS:
            value = dict(value)
        elif spec.name in _NAMED_GROUPS:
            value = _from_dict(_group_schema(spec.name, resolved), value, prefix=f"{spec.name}.")
        elif dataclasses.is_dataclass(spec.default_factory):
            value = _from_dict(spec.default_factory, value, prefix=f"{spec.name}.")
        fields[spec.name] = value
    run = RunConfig(**fields, checkpoint_async=checkpoint_async, resolved=resolved,
                    overrides=_command_line_overrides())
    run.validate()
    return run


def _command_line_overrides() -> tuple[str, ...]:
    """The overrides of the running Hydra job (empty outside one, e.g. under `compose`)."""
    from hydra.core.hydra_config import HydraConfig

    return tuple(HydraConfig.get().overrides.task) if HydraConfig.initialized() else ()


def _group_schema(group: str, resolved: dict[str, Any]) -> type:
    name = resolved[group].get("name")
    _require(name in SCHEMAS_BY_GROUP[group], f"{group}.name", name, f"one of {sorted(SCHEMAS_BY_GROUP[group])}")
    return SCHEMAS_BY_GROUP[group][name]


def _from_dict(schema: type, values: dict[str, Any], *, prefix: str) -> Any:
    """Build a dataclass (nested ones included) from values OmegaConf has already type-checked.

    Keys the schema lacks are refused here: Hydra's `+key=value` adds keys even to typed nodes.
    """
    _reject_unknown_keys(schema, values, prefix=prefix)
    kwargs = {}
    for spec in dataclasses.fields(schema):
        if spec.name in values:
            value = values[spec.name]
            if dataclasses.is_dataclass(spec.default_factory) and isinstance(value, dict):
                value = _from_dict(spec.default_factory, value, prefix=f"{prefix}{spec.name}.")
            kwargs[spec.name] = value
    return schema(**kwargs)


def _reject_unknown_keys(schema: type, values: dict[str, Any], *, prefix: str) -> None:
    known = {spec.name for spec in dataclasses.fields(schema)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"Config key '{prefix}{key}' is not part of the configuration schema "
                              f"({schema.__name__} has {sorted(known)}): check the spelling, or drop the '+'.")
        nested = next(spec for spec in dataclasses.fields(schema) if spec.name == key).default_factory
        if dataclasses.is_dataclass(nested) and isinstance(value, dict):
            _reject_unknown_keys(nested, value, prefix=f"{prefix}{key}.")
