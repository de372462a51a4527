"""Sweeps (``ddpm-train -m``) beyond Hydra's basic launcher: the launcher plugins ddpm knows and the extra
that installs each, and the eval classifiers a sweep trains once, before its jobs may start side by side."""

from __future__ import annotations

import re
from importlib.util import find_spec
from pathlib import Path

from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ddpm.errors import ConfigError
from ddpm.training.scores import job_needs_classifier, prepare_classifier

# The launchers that need a Hydra plugin (ddpm's presets in configs/hydra/launcher/ and the plugins' own):
# the plugin's module, its distribution, and the extra of ddpm that installs it.
LAUNCHER_PLUGINS = {
    **dict.fromkeys(
        ("slurm", "submitit_slurm", "submitit_local"),
        ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher", "slurm"),
    ),
    **dict.fromkeys(
        ("parallel", "joblib"), ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher", "joblib")
    ),
}
SUBMITIT_LAUNCHERS = "hydra_plugins.hydra_submitit_launcher."  # they requeue a job (see on_multirun_start)


def plugin_installed(module: str) -> bool:
    try:
        return find_spec(module) is not None
    except ModuleNotFoundError:  # not even the namespace package hydra_plugins is there
        return False


def require_launcher_plugin(args: list[str]) -> None:
    """A launcher whose plugin is missing is named before Hydra starts: Hydra itself would only say that
    the launcher's config is not found, or that it cannot import the launcher after composing."""
    for arg in args:
        chosen = re.fullmatch(r"\+{0,2}hydra/launcher=(\w+)", arg)
        if chosen is None or chosen.group(1) not in LAUNCHER_PLUGINS:
            continue
        module, distribution, extra = LAUNCHER_PLUGINS[chosen.group(1)]
        if not plugin_installed(module):
            raise ConfigError(
                f"hydra/launcher={chosen.group(1)} needs the {distribution} plugin: "
                f"pip install -e '.[{extra}]' in the ddpm checkout"
            )


def sweep_job_configs(config: DictConfig) -> list[DictConfig]:
    """Each job's composed config, from the sweep's overrides as Hydra's basic sweeper splits them; none
    where another sweeper's syntax is in use (its jobs then prepare what they need themselves)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    except HydraException:
        return []
    hydra_app = GlobalHydra.instance().hydra
    assert hydra_app is not None
    name = config.hydra.job.config_name
    return [hydra_app.compose_config(name, job, run_mode=RunMode.MULTIRUN) for job in jobs]


def prepare_classifiers(jobs: list[DictConfig]) -> list[Path]:
    """The eval classifiers the jobs will score with, trained and cached once each."""
    done: dict[str, Path | None] = {}
    for job in jobs:
        if not job_needs_classifier(job, multirun=True):
            continue
        key = OmegaConf.to_yaml(job.data) + OmegaConf.to_yaml(job.eval)
        if key not in done:
            done[key] = prepare_classifier(job)
    return sorted({p for p in done.values() if p is not None})
