"""The README's Layout section is the map of src/ddpm: every module is on it, and nothing else is."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_layout_names_every_module():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("src/ddpm/", 1)[1].split("\ntests/", 1)[0]
    named, folders = set(), []  # folders: (indent, name) of the folders the current line is inside
    for line in block.splitlines():
        m = re.match(r"^( +)(\S+)", line)
        if not m:
            continue
        indent, name = len(m.group(1)), m.group(2)
        folders = [(i, f) for i, f in folders if i < indent]
        if name.endswith("/"):
            folders.append((indent, name))
        elif name.endswith(".py"):
            named.add("".join(f for _, f in folders) + name)
    src = ROOT / "src" / "ddpm"
    modules = {str(p.relative_to(src)) for p in src.rglob("*.py")}
    plain_inits = {m for m in modules if m.endswith("__init__.py") and len((src / m).read_text()) < 200}
    assert named == modules - plain_inits - {"__init__.py"}
