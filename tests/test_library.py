"""The README's library example runs as written."""

import re
from pathlib import Path

from conftest import TINY, compose

from ddpm.training.loop import train

README = Path(__file__).parents[1] / "README.md"


def test_the_readme_library_example_runs(tmp_path, monkeypatch, capsys):
    section = README.read_text().split("## Library use", 1)[1]
    (code,) = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], re.S)
    # the checkpoint the example loads: any ddpm-train run's
    train(compose("train", TINY + ["steps=1", "forward_n=0"]), tmp_path / "runs/example")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed.startswith("torch.Size([8, 1, 8, 8])") and printed.endswith("torch.Size([16, 1, 8, 8])")
