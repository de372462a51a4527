"""ddpm-train init=PATH: a new run from the weights of a ddpm checkpoint, its export or a diffusers pipeline
folder, with the source's network, objective, variances and classes, and the run's own schedule, data and
optimizer; a contradicting setting is refused before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY, assert_refused, compose, run_entry, write_random

from ddpm import cli
from ddpm.checkpoint import load_checkpoint
from ddpm.training.setup import setup

QUICK = TINY + ["sample_every=0", "checkpoint_every=0", "forward_n=0"]
BASE = [k for k in QUICK if not k.startswith("model.")]  # the network left to the source


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A tiny trained run's checkpoint, with model and EMA weights that differ."""
    root = tmp_path_factory.mktemp("source")
    args = [*QUICK, "steps=3", "timesteps=20", f"hydra.run.dir={root}"]
    assert run_entry(cli.train_main, args, None, keep_output=True)[0] == 0
    return root / "checkpoints" / "last.pt"


def train(capsys, *args: str) -> tuple[int, list[str], str]:
    return run_entry(cli.train_main, list(args), capsys)


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_fine_tuned_run_starts_from_the_source_s_ema_weights_at_step_0(source, tmp_path):
    saved = load_checkpoint(source)
    assert not same_weights(saved["model"], saved["ema"])  # so that the test tells them apart
    overrides = [f"init={source}", "lr=5e-4", "steps=5", "device=cpu", "precision=fp32"]
    cfg = compose("train", overrides)
    run = setup(cfg, tmp_path / "run", overrides)
    assert run.start == 0 and not run.optimizer.state  # step 0, a fresh Adam
    assert same_weights(run.model.state_dict(), saved["ema"])
    assert same_weights(run.ema.model.state_dict(), saved["ema"])  # the EMA starts from the same weights
    assert run.cfg.model.dim == 8 and list(run.cfg.model.dim_mults) == [1, 2]  # the source's network
    assert run.cfg.init == str(source.resolve()) and run.cfg.lr == 5e-4 and run.cfg.timesteps == 200
    assert not (tmp_path / "run").exists()  # set up, nothing written


def test_init_trains_and_records_its_source(source, tmp_path, capsys):
    run = tmp_path / "run"
    code, _, out = train(capsys, *QUICK, f"init={source}", "steps=2", "timesteps=30", f"hydra.run.dir={run}")
    assert code == 0, out
    assert f"fine-tuning from init={source.resolve()} (ema weights of step 3)" in out
    assert "trained for the linear schedule at T=20, this run uses linear at T=30" in out  # the warning
    saved = load_checkpoint(run / "checkpoints" / "last.pt")
    assert saved["step"] == 2 and saved["config"]["init"] == str(source.resolve())
    assert saved["state"]["optimizer"]["state"][0]["step"] == 2  # Adam's count: this run's steps only


def test_model_dropout_may_differ_and_the_source_s_other_keys_stand(source, tmp_path):
    overrides = [f"init={source}", "model.dropout=0.3", "model=unet", "device=cpu"]
    run = setup(compose("train", overrides), tmp_path / "run", overrides)
    assert run.cfg.model.dropout == 0.3 and run.cfg.model.dim == 8  # model=unet names the family only


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.dim=16", "model.dim=16 contradicts init={}'s model.dim=8"),
        ("model=ho2020", "model.name=ho2020 contradicts init={}'s model.name=unet"),
        ("objective=v", "objective=v contradicts init={}'s objective=eps"),
        ("learn_sigma=true", "learn_sigma=true contradicts init={}'s learn_sigma=false"),
        ("class_cond=true", "class_cond=true contradicts init={}'s class_cond=false"),
        ("data.image_size=16", "init={} makes 8x8x1 images, data=digits is 16x16x1"),
    ],
)
def test_a_contradicting_setting_is_refused_naming_both(source, tmp_path, capsys, override, message):
    args = [*BASE, f"init={source}", override, "steps=2", f"hydra.run.dir={tmp_path / 'run'}"]
    code, lines, out = train(capsys, *args)
    assert_refused("ddpm-train", code, lines, out, args)
    assert code == 2 and message.format(source.resolve()) in lines[0], lines
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("init", "message"),
    [
        ("missing.pt", "missing.pt does not exist"),
        ("folder", "folder is a folder, but not a diffusers pipeline (no model_index.json)"),
    ],
)
def test_a_bad_source_is_one_line(tmp_path, capsys, init, message):
    (tmp_path / "folder").mkdir()
    args = [*QUICK, f"init={tmp_path / init}", f"hydra.run.dir={tmp_path / 'run'}"]
    code, lines, out = train(capsys, *args)
    assert_refused("ddpm-train", code, lines, out, args)
    assert f"init={tmp_path}/{message}" in lines[0] and not (tmp_path / "run").exists()


def test_a_continued_run_needs_the_same_init_or_none(source, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(source.parent)  # init= as a relative path, repeated from another directory below
    run = tmp_path / "run"
    first = [*QUICK, "init=last.pt", f"hydra.run.dir={run}", "resume=auto"]
    assert train(capsys, *first, "steps=1")[0] == 0
    monkeypatch.chdir(tmp_path)
    code, _, out = train(capsys, *QUICK, f"init={source}", f"hydra.run.dir={run}", "resume=auto", "steps=2")
    assert code == 0 and "a run fine-tuned from init=" in out, out  # the same source, as another path
    assert train(capsys, *QUICK, f"hydra.run.dir={run}", "resume=auto", "steps=3")[0] == 0  # or none
    other = tmp_path / "other.pt"
    other.write_bytes(source.read_bytes())
    args = [*QUICK, f"init={other}", f"hydra.run.dir={run}", "resume=auto", "steps=4"]
    code, lines, out = train(capsys, *args)
    assert_refused("ddpm-train", code, lines, out, args)
    assert f"init={other} names another source than the run being resumed" in lines[0]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 3  # untouched


def test_init_from_an_export_takes_its_weights(source, tmp_path, capsys):
    export = tmp_path / "weights.safetensors"
    code, _, out = run_entry(cli.export_main, [f"ckpt={source}", f"out={export}"], capsys)
    assert code == 0, out
    overrides = [f"init={export}", "device=cpu"]
    run = setup(compose("train", overrides), tmp_path / "run", overrides)
    assert same_weights(run.model.state_dict(), load_checkpoint(source)["ema"])


def test_a_conditional_source_needs_as_many_classes(tmp_path, capsys):
    src = tmp_path / "src"
    args = [*QUICK, "class_cond=true", "steps=1", f"hydra.run.dir={src}"]
    assert train(capsys, *args)[0] == 0
    folder = tmp_path / "two"
    for name in ("a", "b"):
        (folder / name).mkdir(parents=True)
        for i in range(8):
            write_random(folder / name / f"{i}.png", (8, 8), seed=i)
    data = ["data=folder", f"data.root={folder}", "data.image_size=8", "data.channels=1"]
    args = [*QUICK, *data, f"init={src / 'checkpoints' / 'last.pt'}", f"hydra.run.dir={tmp_path / 'run'}"]
    code, lines, out = train(capsys, *args)
    assert_refused("ddpm-train", code, lines, out, args)
    assert "is conditional on 10 classes, the data have 2" in lines[0]


# ---------------------------------------------------------------------------- from a diffusers pipeline
def test_init_from_a_diffusers_pipeline_computes_what_its_unet2dmodel_computes(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from test_diffusers_interop import TINY8, random_unet, save_pipeline

    unet = random_unet({**TINY8, "in_channels": 1, "out_channels": 1})  # the digits' 8x8x1
    folder = save_pipeline(unet, tmp_path / "pipe", num_train_timesteps=1000)
    overrides = [f"init={folder}", "device=cpu", "precision=fp32", "model.dropout=0.1"]
    run = setup(compose("train", overrides), tmp_path / "run", overrides)
    assert run.cfg.model.name == "ho2020" and run.cfg.model.variant == "original"
    assert run.cfg.model.dropout == 0.1 and run.cfg.timesteps == 200  # the run's T; the warning says so
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3, 150])
    run.model.eval()
    with torch.no_grad():
        assert (run.model(x, t, None) - unet(x, t).sample).abs().max() < 1e-5  # fp32, other summation orders
    code, _, out = train(capsys, *BASE, f"init={folder}", "steps=1", f"hydra.run.dir={tmp_path / 'ft'}")
    assert code == 0, out
    assert "(model weights of step 0)" in out and "trained for the linear schedule at T=1000" in out
