import os

import pytest
import torch
from conftest import Exploit

from ddpm.checkpoint import link_checkpoint, load_checkpoint, save_checkpoint
from ddpm.errors import CheckpointError
from ddpm.models import build_model
from ddpm.trained import load_trained
from ddpm.training.rundir.plan import plain_config


@pytest.fixture
def cfg(compose_cfg):
    from conftest import TINY

    return compose_cfg("train", TINY)


def test_round_trip_rebuilds_model_and_schedule(cfg, tmp_path):
    model = build_model(cfg.model, cfg.data.channels, cfg.data.image_size)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path / "c.pt", step=7, model=weights, config=plain_config(cfg))
    assert not list(tmp_path.glob(".*.tmp"))
    trained = load_trained(tmp_path / "c.pt", torch.device("cpu"))
    assert trained.step == 7 and trained.data == plain_config(cfg)["data"] and trained.class_names is None
    assert (trained.diffusion.loss.name, trained.diffusion.objective.name) == ("huber", "eps")
    assert trained.diffusion.timesteps == cfg.timesteps and trained.shape == (1, 8, 8)
    for k, v in trained.network.state_dict().items():
        torch.testing.assert_close(v, weights[k])
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 4])
    torch.testing.assert_close(trained.network(x, t), model.eval()(x, t))


def test_link_makes_last_the_same_file(tmp_path):
    save_checkpoint(tmp_path / "step_000001.pt", step=1, model={}, config={})
    link_checkpoint(tmp_path / "step_000001.pt", tmp_path / "last.pt")
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 1
    save_checkpoint(tmp_path / "step_000002.pt", step=2, model={}, config={})
    link_checkpoint(tmp_path / "step_000002.pt", tmp_path / "last.pt")
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 2


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"ckpt=.*nope.pt does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_truncated_file(cfg, tmp_path):
    model = build_model(cfg.model, cfg.data.channels, cfg.data.image_size)
    save_checkpoint(tmp_path / "c.pt", step=1, model=model.state_dict(), config=plain_config(cfg))
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")


@pytest.mark.parametrize("content", [b"", b"hello", b"PK\x03\x04garbage", b"\x00" * 100])
def test_foreign_bytes(tmp_path, content):
    (tmp_path / "x.pt").write_bytes(content)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "x.pt")


def test_torch_file_of_another_tool(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a ddpm checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save(
        {"format": "ddpm-checkpoint", "version": 1, "payload": Exploit(str(marker))}, tmp_path / "evil.pt"
    )
    with pytest.raises(CheckpointError, match=r"evil.pt was refused: loading it would call posix.system"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_weights_of_another_architecture(cfg, tmp_path):
    config = plain_config(cfg)
    save_checkpoint(tmp_path / "c.pt", step=1, model={"w": torch.zeros(3)}, config=config)
    with pytest.raises(CheckpointError, match="does not match"):
        load_trained(tmp_path / "c.pt", torch.device("cpu"))


def test_safetensors_export_loads_like_its_checkpoint(cfg, tmp_path):
    from ddpm.checkpoint import export_safetensors

    model = build_model(cfg.model, cfg.data.channels, cfg.data.image_size)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    ema = {k: v + 1 for k, v in raw.items()}
    save_checkpoint(tmp_path / "c.pt", step=5, model=raw, ema=ema, config=plain_config(cfg))
    payload = load_checkpoint(tmp_path / "c.pt")
    assert export_safetensors(payload, tmp_path / "ema.safetensors") == "ema"
    assert export_safetensors(payload, tmp_path / "raw.safetensors", ema=False) == "model"
    assert (tmp_path / "ema.safetensors").read_bytes()[:8] != b"PK\x03\x04"  # not a zip of pickles
    mode = lambda name: os.stat(tmp_path / name).st_mode & 0o777  # noqa: E731
    assert mode("ema.safetensors") == mode("c.pt")  # shareable as any file the user writes
    for name, want in (("ema", ema), ("raw", raw)):
        trained = load_trained(tmp_path / f"{name}.safetensors", torch.device("cpu"))
        assert trained.step == 5 and trained.data == payload["config"]["data"]
        assert trained.diffusion.timesteps == cfg.timesteps
        assert all(torch.equal(v, want[k]) for k, v in trained.network.state_dict().items())


def test_broken_and_foreign_safetensors_are_refused(tmp_path):
    from safetensors.torch import save_file

    from ddpm.checkpoint import export_safetensors

    save_file({"w": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a ddpm export"):
        load_checkpoint(tmp_path / "other.safetensors")
    export_safetensors(
        {"step": 1, "model": {"w": torch.zeros(1000)}, "config": {}}, tmp_path / "x.safetensors"
    )
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"ckpt=.*cut.safetensors is not a readable .safetensors file"):
        load_checkpoint(tmp_path / "cut.safetensors")


def test_weights_in_takes_the_ema_where_asked_and_an_export_s_one_set_always():
    from ddpm.checkpoint import weights_in

    both, raw_only, ema_only = {"model": {}, "ema": {}}, {"model": {}}, {"ema": {}}
    assert (weights_in(both), weights_in(both, ema=False)) == ("ema", "model")
    assert (weights_in(raw_only), weights_in(raw_only, ema=False)) == ("model", "model")
    assert (weights_in(ema_only), weights_in(ema_only, ema=False)) == ("ema", "ema")  # an EMA export
