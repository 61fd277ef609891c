"""Hydra's side of the configuration: registering the schema and composing `conf/`.

Owns: the schema's registration in Hydra's ConfigStore (so conf/<group>/<name>.yaml extend typed
nodes and Hydra refuses misspelt keys and wrong types), the `run_dir` resolver that gives each
multirun job a stable directory, and `compose`, the config `python train.py OVERRIDES` runs on.
"""

from __future__ import annotations

import re

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.nodes import BooleanNode

from harness import PROJECT_ROOT
from harness.config.schema import SCHEMAS_BY_GROUP, Config
from harness.errors import ConfigError


def _schema_node() -> DictConfig:
    """The top-level schema as a DictConfig, with keys dataclasses cannot declare."""
    node = OmegaConf.structured(Config)
    with open_dict(node.checkpoint):
        node.checkpoint["async"] = BooleanNode(False)  # save in the background
    OmegaConf.set_struct(node.init_from_name_map, False)  # user keys: `init_from_name_map={a:b}` without `+`
    return node


def _job_suffix() -> str:
    """Resolver for `run_dir`: '' in a single run, '/<overrides>' for each job of a multirun.

    Each multirun job needs its own stable run directory; the override string is deterministic,
    so rerunning the same sweep command resumes every job from its own checkpoints.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return ""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return ""
    overrides = hydra_cfg.job.override_dirname or f"job{hydra_cfg.job.num}"
    return "/" + re.sub(r"[^A-Za-z0-9_.,=+-]", "_", overrides)


def register_configs() -> None:
    """Register the schema and resolvers with Hydra. Idempotent; call before composing."""
    from hydra.core.config_store import ConfigStore

    if not OmegaConf.has_resolver("harness_job_suffix"):
        OmegaConf.register_new_resolver("harness_job_suffix", _job_suffix)
    store = ConfigStore.instance()
    store.store(name="schema", node=_schema_node())
    for group, schemas in SCHEMAS_BY_GROUP.items():
        for name, schema in schemas.items():
            store.store(group=f"schema/{group}", name=name, node=schema)  # conf/<group>/<name>.yaml extend these


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The DictConfig `python train.py OVERRIDES` would run on, via Hydra's compose API over conf/.

    For tools and tests outside a running Hydra app: it resets Hydra's global state. Overrides
    that do not compose (a misspelt key, an unknown group option, a wrong type) raise `ConfigError`
    with Hydra's explanation, as `train.py` reports them.
    """
    import os

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    conf_dir = os.path.join(PROJECT_ROOT, "conf")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        try:
            return hydra_compose(config_name="config", overrides=list(overrides))
        except (HydraException, OmegaConfBaseException) as error:
            cause = error.__cause__ if isinstance(error.__cause__, OmegaConfBaseException) else None
            detail = " ".join(line.strip() for line in str(cause or error).splitlines() if line.strip())
            raise ConfigError(f"The overrides {' '.join(overrides) or '(none)'} do not compose: {detail}") from None
