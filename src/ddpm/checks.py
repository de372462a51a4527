"""The range checks that the config's types cannot express, each raising ConfigError with one line that
names the key, its value and what it may be. NaN fails every one of them (NaN >= x is false)."""

from __future__ import annotations

import math
from collections.abc import Iterable

from ddpm.errors import ConfigError


def finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{name}={value} is invalid: it must be a finite number")


def at_least(name: str, value: float, low: float) -> None:
    finite(name, value)
    if not value >= low:
        raise ConfigError(f"{name}={value} is invalid: it must be >= {low}")


def above(name: str, value: float, low: float) -> None:
    finite(name, value)
    if not value > low:
        raise ConfigError(f"{name}={value} is invalid: it must be > {low}")


def within(name: str, value: float, low: float, high: float, note: str = "") -> None:
    """low <= value < high."""
    if not low <= value < high:
        raise ConfigError(f"{name}={value} is invalid: it must lie in [{low}, {high}){note}")


def one_of(name: str, value: object, choices: Iterable[object]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is invalid: choose one of {', '.join(map(str, choices))}")
