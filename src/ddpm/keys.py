"""What each training key is to a run, said once, beside its type in the schema.

A key is fixed by default: the weights were trained with it, so a resumed run must keep it, and a sweep's
folder names show it. ``resumable()`` marks one that a resumed run may change (how long it runs, where its
images are, how it reports and draws); ``named=False`` keeps it out of the sweep folders' names as well,
for the keys that change neither the weights nor what is drawn, so that ``-m ... resume=auto steps=N``
finds the first sweep's folders. The list a resumed run checks (plan.py) and the folder names' exclusions
(train.yaml's ``exclude_keys``, through the ``ddpm.unnamed_keys`` resolver) are both read from here.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from omegaconf import MISSING

RESUMABLE = "ddpm.resumable"
NAMED = "ddpm.named"


def resumable(default: Any = MISSING, *, named: bool = True) -> Any:
    """A schema field that a resumed run may change; with ``named=False``, also one that a sweep's folder
    names leave out. On a field that holds a nested schema, it holds for every key under it."""
    return dataclasses.field(default=default, metadata={RESUMABLE: True, NAMED: named})


def _nested(hint: Any) -> type | None:
    """The dataclass a field's type names, if any (``X`` or ``X | None``)."""
    for candidate in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(candidate):
            return candidate  # type: ignore[return-value]
    return None


def leaves(
    schema: type,
    groups: Mapping[str, Iterable[type]],
    prefix: str = "",
    above: tuple[bool, bool] = (False, True),
) -> Iterator[tuple[str, bool, bool]]:
    """(dotted key, resumable, named) for every key under ``schema``: resumable where it or a field above
    it is marked so, named unless it or a field above it says otherwise. ``groups`` gives, for each field
    that is a config group (schedule, model, data), the schemas of all its options, since which one a
    run uses is chosen at run time."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        path = prefix + f.name
        marks = (above[0] or f.metadata.get(RESUMABLE, False), above[1] and f.metadata.get(NAMED, True))
        nested = _nested(hints[f.name])
        schemas = list(groups.get(path, ())) or ([nested] if nested is not None else [])
        if not schemas:
            yield path, *marks
            continue
        seen: dict[str, tuple[bool, bool]] = {}
        for option in schemas:
            for key, *key_marks in leaves(option, {}, path + ".", marks):
                if seen.setdefault(key, tuple(key_marks)) != tuple(key_marks):
                    raise TypeError(f"{key} is marked differently in the schemas of the {path} group")
        yield from ((key, *key_marks) for key, key_marks in seen.items())


def resumable_keys(schema: type, groups: Mapping[str, Iterable[type]]) -> tuple[str, ...]:
    return tuple(key for key, resumes, _ in leaves(schema, groups) if resumes)


def unnamed_keys(schema: type, groups: Mapping[str, Iterable[type]]) -> tuple[str, ...]:
    return tuple(key for key, _, named in leaves(schema, groups) if not named)


def described(keys: Iterable[str], every_key: Iterable[str]) -> str:
    """``keys`` for a message, a group of keys that holds all of its parent's as ``parent.*``."""
    keys, every_key = list(keys), list(every_key)
    shown: list[str] = []
    for key in keys:
        parent = key.split(".")[0] if "." in key else None
        under = [k for k in every_key if parent is not None and k.startswith(parent + ".")]
        if parent is not None and set(under) <= set(keys):
            if parent + ".*" not in shown:
                shown.append(parent + ".*")
        else:
            shown.append(key)
    return ", ".join(shown)
