import pytest
import torch
from conftest import TINY

from ddpm.checkpoint import load_checkpoint
from ddpm.trained import load_trained
from ddpm.training.ema import EMA, ema_decay
from ddpm.training.loop import train


def test_warmup_rule():
    assert ema_decay(0.999, 10, 1) == pytest.approx(2 / 11)
    assert ema_decay(0.999, 10, 90) == pytest.approx(91 / 100)
    assert ema_decay(0.999, 10, 10**6) == 0.999
    assert ema_decay(0.99, 0, 1) == 0.99


def test_update_is_the_moving_average():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9, warmup=0)
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(step=1)
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v, 0.9 * start[k] + 0.1 * model.state_dict()[k])
    assert all(not p.requires_grad for p in ema.model.parameters())


def test_update_never_reads_its_weight_back():
    """The weight stays a device tensor (a captured CUDA graph replays the update, and capture refuses a
    read-back): on the meta device, which holds no values, any .item() would raise."""
    model = torch.nn.Linear(4, 3, device="meta")
    ema = EMA(model, decay=0.999, warmup=10)
    ema.update(5)
    assert all(p.device.type == "meta" for p in ema.model.parameters())


def test_checkpoint_holds_ema_and_sampling_chooses(compose_cfg, tmp_path):
    cfg = compose_cfg(
        "train", TINY + ["steps=5", "sample_every=0", "forward_n=0", "ema.decay=0.5", "ema.warmup=0"]
    )
    train(cfg, tmp_path)
    payload = load_checkpoint(tmp_path / "checkpoints/last.pt")
    assert set(payload) >= {"model", "ema"}
    assert any(not torch.equal(payload["model"][k], payload["ema"][k]) for k in payload["model"])
    ema = load_trained(tmp_path / "checkpoints/last.pt", torch.device("cpu"), ema=True)
    raw = load_trained(tmp_path / "checkpoints/last.pt", torch.device("cpu"), ema=False)
    assert ema.weights == "ema" and raw.weights == "model"
    for k, v in ema.network.state_dict().items():
        torch.testing.assert_close(v, payload["ema"][k])
    for k, v in raw.network.state_dict().items():
        torch.testing.assert_close(v, payload["model"][k])


def test_no_ema_means_no_ema_in_the_checkpoint(compose_cfg, tmp_path):
    cfg = compose_cfg("train", TINY + ["steps=2", "sample_every=0", "forward_n=0", "ema.decay=0"])
    train(cfg, tmp_path)
    assert "ema" not in load_checkpoint(tmp_path / "checkpoints/last.pt")
    info = load_trained(tmp_path / "checkpoints/last.pt", torch.device("cpu"), ema=True)
    assert info.weights == "model"
