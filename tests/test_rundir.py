"""The run directory's bookkeeping and the writer that writes into it."""

import json

import pytest
import torch

from ddpm.checkpoint import load_checkpoint
from ddpm.errors import ConfigError
from ddpm.training.rundir.bookkeeping import (
    holds_run,
    prune_checkpoints,
    refuse_existing_run,
    remove_partial_writes,
    rewind_metrics,
    same_run,
    step_checkpoints,
)
from ddpm.training.rundir.writer import RunWriter
from ddpm.training.stopping import TrainingStopped


def test_only_what_ddpm_train_writes_makes_a_run(tmp_path):
    (tmp_path / ".hydra").mkdir()
    assert not holds_run(tmp_path)
    refuse_existing_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    assert holds_run(tmp_path)
    with pytest.raises(ConfigError, match="already holds a run: continue it with resume=auto"):
        refuse_existing_run(tmp_path)


def test_keep_last_removes_the_oldest_up_to_the_step(tmp_path):
    for step in (1, 2, 3, 5, 8):
        (tmp_path / f"step_{step:06d}.pt").write_bytes(b"")
    (tmp_path / "last.pt").write_bytes(b"")
    assert sorted(step_checkpoints(tmp_path)) == [1, 2, 3, 5, 8]
    # at step 3 of a run resumed from step 3: 5 and 8 are later, and are replaced as the run gets there
    assert [p.name for p in prune_checkpoints(tmp_path, 2, 3)] == ["step_000001.pt"]
    assert sorted(step_checkpoints(tmp_path)) == [2, 3, 5, 8]
    assert prune_checkpoints(tmp_path, 0, 8) == []


def test_metrics_are_wound_back_and_a_cut_line_is_dropped(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"st')
    assert rewind_metrics(metrics, 2) == 2
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]
    other = tmp_path / "other.jsonl"
    assert rewind_metrics(other, 1, source=metrics) == 1
    assert rewind_metrics(tmp_path / "none.jsonl", 5) == 0


def test_half_written_files_are_removed(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints/.step_000002.pt.tmp").write_bytes(b"")
    (tmp_path / "checkpoints/step_000001.pt").write_bytes(b"")
    assert [p.name for p in remove_partial_writes(tmp_path)] == [".step_000002.pt.tmp"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000001.pt"]


def test_same_run_is_the_checkpoints_run_directory(tmp_path):
    assert same_run(tmp_path / "run/checkpoints/last.pt", tmp_path / "run")
    assert not same_run(tmp_path / "run/checkpoints/last.pt", tmp_path / "other")


def test_the_writer_keeps_last_pt_on_the_newest_checkpoint(tmp_path):
    writer = RunWriter(tmp_path, keep_last=1)
    writer.open(0, None, None)
    weights = {"w": torch.ones(2)}
    for step in (1, 2):
        writer.checkpoint(step, weights, config={}, state=None)
    writer.metrics({"step": 2, "loss": 0.5})
    writer.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.pt", "step_000002.pt"]
    assert load_checkpoint(tmp_path / "checkpoints/last.pt")["step"] == 2
    assert writer.last_ckpt == tmp_path / "checkpoints/step_000002.pt"
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 2, "loss": 0.5}


def test_a_file_the_writer_cannot_write_stops_the_run_naming_what_is_kept(tmp_path):
    writer = RunWriter(tmp_path, keep_last=0)
    writer.open(0, None, None)
    writer.checkpoint(1, {"w": torch.ones(1)}, config={})
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples/.step_000002.png.tmp").symlink_to("/dev/full")
    with pytest.raises(TrainingStopped, match=r"No space left on device; the last good checkpoint, .*"):
        writer.grid(2, torch.zeros(4, 1, 8, 8))
    writer.close()
