"""One place per config group option: its name, its schema, what it builds and its own checks.

Every list of choices (the ``--help`` groups, error messages, the ConfigStore entries the YAML files
extend) is derived from a registry, so adding an option is one ``Option(...)`` beside the code it builds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ddpm.errors import ConfigError

T = TypeVar("T")


def no_checks(*args: Any) -> None:
    """For options whose keys the schema's types already check."""


@dataclass(frozen=True)
class Option(Generic[T]):
    """A choice of a config group (``schedule=cosine``, ``model=ho2020``, ...)."""

    name: str
    schema: type  # the dataclass that types the group's keys (stored as schema/<group>/<schema_name>)
    build: Callable[..., T]
    check: Callable[..., None] = no_checks  # the checks the schema's types cannot express
    schema_name: str | None = None  # when several options share one schema (the torchvision sets)

    @property
    def stored_as(self) -> str:
        return self.schema_name or self.name


class Registry(Generic[T]):
    """The options of one config group, by name."""

    def __init__(self, group: str, *options: Option[T]) -> None:
        self.group = group
        self._options = {o.name: o for o in options}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._options)

    def __iter__(self) -> Iterator[Option[T]]:
        return iter(self._options.values())

    def __contains__(self, name: object) -> bool:
        return name in self._options

    def __getitem__(self, name: str) -> Option[T]:
        """The option ``name``; ConfigError listing the choices if there is none."""
        try:
            return self._options[name]
        except KeyError:
            raise ConfigError(
                f"{self.group}.name={name!r} is invalid: choose one of {', '.join(self.names)}"
            ) from None
