import json

import pytest
import torch
from conftest import TINY

from ddpm.checkpoint import load_checkpoint
from ddpm.config import ConfigError
from ddpm.train import resolve_device, train


def test_train_writes_the_run_directory(compose_cfg, tmp_path):
    cfg = compose_cfg("train", TINY + ["steps=4", "sample_every=2", "checkpoint_every=3", "timesteps=20"])
    summary = train(cfg, tmp_path)
    names = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert names == [
        "checkpoints/last.pt",
        "checkpoints/step_000003.pt",
        "checkpoints/step_000004.pt",
        "forward.png",
        "metrics.jsonl",
        "samples/step_000002.png",
        "samples/step_000004.png",
    ]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all({"step", "loss", "lr", "img_per_s"} <= set(r) and r["lr"] == 1e-3 for r in rows)
    assert summary["steps"] == 4 and summary["final_loss"] == rows[-1]["loss"]
    assert load_checkpoint(tmp_path / "checkpoints/last.pt")["step"] == 4


def test_zero_cadence_means_only_at_the_end(compose_cfg, tmp_path):
    cfg = compose_cfg(
        "train", TINY + ["steps=3", "sample_every=0", "checkpoint_every=0", "forward_n=0", "log_every=2"]
    )
    train(cfg, tmp_path)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_000003.png"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.pt", "step_000003.pt"]
    assert not (tmp_path / "forward.png").exists()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3]


def test_the_loss_goes_down(compose_cfg, tmp_path):
    cfg = compose_cfg(
        "train", TINY + ["steps=60", "sample_every=0", "checkpoint_every=0", "forward_n=0", "log_every=10"]
    )
    train(cfg, tmp_path)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.6 * losses[0]


def test_same_seed_same_weights(compose_cfg, tmp_path):
    overrides = TINY + ["steps=3", "sample_every=0", "checkpoint_every=0", "forward_n=0", "timesteps=10"]
    train(compose_cfg("train", overrides), tmp_path / "a")
    train(compose_cfg("train", overrides), tmp_path / "b")
    train(compose_cfg("train", overrides + ["seed=1"]), tmp_path / "c")
    a, b, c = (load_checkpoint(tmp_path / x / "checkpoints/last.pt")["model"] for x in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_batch_larger_than_the_data_set_is_refused_before_writing(compose_cfg, tmp_path):
    cfg = compose_cfg("train", TINY + ["batch_size=5000"])
    with pytest.raises(ConfigError, match=r"batch_size=5000 is larger than the data set \(1797 images\)"):
        train(cfg, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_requested_without_cuda():
    with pytest.raises(ConfigError, match="device=cuda but no CUDA device is available"):
        resolve_device("cuda")


def test_auto_device():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
