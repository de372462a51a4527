"""The installed package is the source tree: pyproject.toml names its packages one by one (setuptools has
nothing to guess), so a new subpackage left out of that list would import from a checkout and be missing
from every wheel and non-editable install."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11 on
ROOT = Path(__file__).resolve().parents[1]


def declared() -> tuple[set[str], dict[str, str]]:
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(tool["packages"]), tool["package-dir"]


def test_every_source_package_is_declared():
    packages, dirs = declared()
    source = ROOT / dirs["ddpm"]
    found = {".".join(("ddpm", *p.parent.relative_to(source).parts)) for p in source.rglob("__init__.py")}
    assert found - packages == set(), "add these to [tool.setuptools] packages"


def test_every_config_folder_is_declared():
    packages, dirs = declared()
    configs = ROOT / dirs["ddpm.configs"]
    found = {
        ".".join(("ddpm.configs", *p.parent.relative_to(configs).parts)) for p in configs.rglob("*.yaml")
    }
    assert found - packages == set(), "add these to [tool.setuptools] packages"
