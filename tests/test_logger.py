"""logger=tensorboard: the run's metrics rows and grids as TensorBoard events, read back by TensorBoard's
own event reader."""

import json

import numpy as np
import pytest
from conftest import TINY
from PIL import Image

from ddpm.training.loop import train

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

RUN = TINY + ["steps=4", "timesteps=20", "sample_every=2", "checkpoint_every=2", "forward_n=0"]


def events(run):
    board = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    board.Reload()
    return board


def test_every_metrics_value_and_grid_is_in_tensorboard(compose_cfg, tmp_path):
    train(compose_cfg("train", RUN + ["logger=tensorboard"]), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    board = events(tmp_path)
    numeric = {k for row in rows for k, v in row.items() if k != "step" and isinstance(v, int | float)}
    assert {"loss", "lr", "img_per_s", "grad_norm", "loss_q0", "skipped"} <= numeric
    assert set(board.Tags()["scalars"]) == numeric
    for key in numeric:
        logged = [(e.step, e.value) for e in board.Scalars(key)]
        expected = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
        assert [s for s, _ in logged] == [s for s, _ in expected], key
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6), key
    images = board.Images("samples")
    assert [e.step for e in images] == [2, 4]
    grid = Image.open(tmp_path / "samples/step_000004.png")
    assert (images[-1].width, images[-1].height) == grid.size


def test_a_resumed_run_logs_each_step_once(compose_cfg, tmp_path):
    # What a run killed after step 3 leaves: events up to step 3, a checkpoint at step 2.
    train(compose_cfg("train", RUN + ["steps=3", "logger=tensorboard"]), tmp_path)
    (tmp_path / "checkpoints/step_000003.pt").unlink()
    (tmp_path / "checkpoints/last.pt").unlink()
    (tmp_path / "checkpoints/last.pt").hardlink_to(tmp_path / "checkpoints/step_000002.pt")
    resumed = RUN + ["resume=auto", "logger=tensorboard"]
    train(compose_cfg("train", resumed), tmp_path, resumed)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [(e.step, e.value) for e in events(tmp_path).Scalars("loss")]
    assert [s for s, _ in losses] == [1, 2, 3, 4]
    assert np.allclose([v for _, v in losses], [r["loss"] for r in rows])


def test_logger_none_writes_no_events(compose_cfg, tmp_path):
    train(compose_cfg("train", RUN + ["steps=1"]), tmp_path)
    assert not (tmp_path / "tensorboard").exists()
