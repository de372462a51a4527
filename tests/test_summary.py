"""A sweep ends in an answer: summary.csv / .md / .png for a sweep folder or any folder of runs."""

import csv
import json
import shutil

import pytest
from conftest import TINY, assert_refused, compose, run_entry
from PIL import Image

from ddpm import cli
from ddpm.summary import write_summary
from ddpm.training.loop import train

QUICK = TINY + ["steps=2", "timesteps=20", "sample_every=0", "forward_n=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three runs as a sweep leaves them: two on the digits (one scored), one on a folder of images."""
    root = tmp_path_factory.mktemp("sweep")
    for name, extra in (("0_loss=l1", ["loss=l1"]), ("1_loss=l2", ["loss=l2"])):
        train(compose("train", QUICK + extra), root / name)
        (root / name / ".hydra").mkdir()
        (root / name / ".hydra/overrides.yaml").write_text(f"- {extra[0]}\n- steps=2\n")
        (root / name / ".hydra/config.yaml").write_text("data:\n  name: digits\n")
    scored = root / "1_loss=l2/eval/last_seed0"
    scored.mkdir(parents=True)
    report = {"features": {"classifier": {"fid": 1.5, "kid": 0.01}}}
    (scored / "eval.json").write_text(json.dumps(report))
    return root


def test_a_sweep_gets_one_row_per_run_best_fid_first(runs):
    notes = write_summary(runs)
    rows = list(csv.DictReader((runs / "summary.csv").open()))
    assert [r["run"] for r in rows] == ["1_loss=l2", "0_loss=l1"]  # the scored run first
    assert [r["overrides"] for r in rows] == ["loss=l2", "loss=l1"]  # steps=2 is shared: left out
    assert rows[0]["fid"] == "1.5" and rows[1]["fid"] == ""
    assert all(
        int(r["steps"]) == 2 and float(r["final_loss"]) > 0 and float(r["img_per_s"]) > 0 for r in rows
    )
    assert rows[0]["grid"] == "1_loss=l2/samples/step_000002.png"
    assert any("without eval.json" in n for n in notes)
    md = (runs / "summary.md").read_text()
    assert "| run | overrides |" in md and "loss=l2" in md
    assert Image.open(runs / "summary.png").size[0] > 500


def test_runs_of_different_data_sets_are_said_not_to_compare(runs, tmp_path):
    other = tmp_path / "mixed"
    other.mkdir()
    for name in ("0_loss=l1", "1_loss=l2"):
        shutil.copytree(runs / name, other / name)
    (other / "2_folder/.hydra").mkdir(parents=True)
    (other / "2_folder/metrics.jsonl").write_text('{"step": 1, "loss": 0.5, "img_per_s": 10}\n')
    (other / "2_folder/.hydra/config.yaml").write_text("data:\n  name: folder\n")
    notes = write_summary(other)
    assert any("different data sets (digits, folder)" in n for n in notes)


def test_ddpm_summary_rebuilds_them_and_refuses_a_folder_without_runs(runs, tmp_path, monkeypatch, capsys):
    (runs / "summary.csv").unlink(missing_ok=True)  # another test may not have written it yet
    monkeypatch.setattr("sys.argv", ["ddpm-summary", str(runs)])
    cli.summary_main()
    assert (runs / "summary.csv").is_file() and "summary.md" in capsys.readouterr().out
    code, lines, output = run_entry(cli.summary_main, [str(tmp_path)], capsys)
    assert_refused("ddpm-summary", code, lines, output, [str(tmp_path)])
    assert "holds no runs" in lines[0]
