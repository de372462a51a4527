"""A config as flat dotted keys and back, the keys a command line sets, a resolved config as plain
values, and a value as a command line spells it: what a resumed or fine-tuned run compares its config
with, and says when it refuses one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"model": {"dim": 8}} -> {"model.dim": 8}."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def override_keys(overrides: Sequence[str]) -> list[str]:
    """The config keys (or groups) that Hydra overrides set, by Hydra's own parser: "+model.dim=8" ->
    "model.dim", "experiment=x" -> "experiment"."""
    return [o.key_or_group for o in OverridesParser.create().parse_overrides(list(overrides))]


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"model.dim": 8} -> {"model": {"dim": 8}}."""
    nested: dict[str, Any] = {}
    for path, value in flat.items():
        node = nested
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python values (enums as names), without Hydra's own node."""
    mine = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    config = OmegaConf.to_container(mine, resolve=True, enum_to_str=True)
    assert isinstance(config, dict)
    return config


def shown(value: Any) -> str:
    """A config value as a command line spells it: true/false/null, not Python's True/False/None."""
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)
