"""One place per config group option: its name, its schema, what it builds and its own checks.

Every list of choices (the ``--help`` groups, error messages, the ConfigStore entries the YAML files
extend) is derived from a registry, so adding an option is one ``Option(...)`` beside the code it builds.
Each group states its calling convention once, as the two Protocols its registry is typed with (what
``build`` and ``check`` take and give): ``BuildBetas`` / ``CheckSchedule`` (schedules.py), ``BuildModel``
/ ``CheckModel`` (models/base.py), ``BuildDataset`` / ``CheckData`` (data/sets.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ddpm.errors import ConfigError

Build = TypeVar("Build", bound=Callable[..., Any])
Check = TypeVar("Check", bound=Callable[..., None])


def no_checks(*args: Any) -> None:
    """For options whose keys the schema's types already check."""


@dataclass(frozen=True)
class Option(Generic[Build, Check]):
    """A choice of a config group (``schedule=cosine``, ``model=ho2020``, ...)."""

    name: str
    schema: type  # the dataclass that types the group's keys (stored as schema/<group>/<schema_name>)
    build: Build
    check: Check = no_checks  # type: ignore[assignment] (takes anything) the checks types cannot express
    schema_name: str | None = None  # when several options share one schema (the torchvision sets)

    @property
    def stored_as(self) -> str:
        return self.schema_name or self.name


class Registry(Generic[Build, Check]):
    """The options of one config group, by name."""

    def __init__(self, group: str, *options: Option[Build, Check]) -> None:
        self.group = group
        self._options = {o.name: o for o in options}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._options)

    def __iter__(self) -> Iterator[Option[Build, Check]]:
        return iter(self._options.values())

    def __contains__(self, name: object) -> bool:
        return name in self._options

    def __getitem__(self, name: str) -> Option[Build, Check]:
        """The option ``name``; ConfigError listing the choices if there is none."""
        try:
            return self._options[name]
        except KeyError:
            raise ConfigError(
                f"{self.group}.name={name!r} is invalid: choose one of {', '.join(self.names)}"
            ) from None
