"""Bad input to each command, through its real entry point in this process: one line naming the bad value
and the valid choices, exit status 2, no trace, and nothing written."""

import sys

import pytest
from conftest import FIXTURES, assert_refused, run_entry

from ddpm import cli

BAD_TRAIN = [
    (["loss=mse"], "Invalid value 'mse', expected one of [l1, l2, huber, kl]"),
    (["schedule=exp"], "schedule=exp is invalid: choose one of cosine, given, linear, quadratic, sigmoid"),
    (
        ["data=imagenet"],
        "data=imagenet is invalid: choose one of cifar10, digits, fashion_mnist, folder, mnist",
    ),
    (["model=resnet"], "model=resnet is invalid: choose one of ho2020, ho2020_256, unet"),
    (["timesteps=0"], "timesteps=0 is invalid: it must be >= 1"),
    (["batch_size=0"], "batch_size=0 is invalid: it must be >= 1"),
    (
        ["data.image_size=10", "model.dim_mults=[1,2,4]"],
        "data.image_size=10 is invalid for model.dim_mults=[1, 2, 4]",
    ),
    (["data=folder", "data.root=missing"], "data.root=missing is not a folder"),
    (["data=folder", "data.root=empty"], "data.root=empty holds no images"),
    (["data=folder", "data.root=junk"], "data.root=junk holds no readable image"),
    (["data=folder"], "data.root is required"),
    (
        ["data=mnist", "data.root=nodata", "data.download=false"],
        "data=mnist: the data set in data.root=nodata is not there",
    ),
    (["timestep=5"], "Key 'timestep' not in 'TrainConfig'"),
    (["steps=many"], "Value 'many' of type 'str' could not be converted to Integer"),
    (["logger=wandb"], "Invalid value 'wandb', expected one of [none, tensorboard]"),
    (["precision=fp16"], "Invalid value 'fp16', expected one of [auto, fp32, bf16]"),
    (["device=cpu", "cuda_graph=true"], "cuda_graph=true needs a CUDA device, not cpu: use cuda_graph=null"),
    (["check_every=0"], "check_every=0 is invalid"),
]


@pytest.mark.parametrize(("args", "message"), BAD_TRAIN, ids=[" ".join(a) for a, _ in BAD_TRAIN])
def test_bad_train_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"not a png")
    code, lines, output = run_entry(cli.train_main, [*args, "steps=1", "hydra.run.dir=run"], capsys)
    assert_refused("ddpm-train", code, lines, output, args)
    assert code == 2 and message in lines[0]
    made = [p.relative_to(tmp_path / "run").parts[0] for p in (tmp_path / "run").rglob("*")]
    assert set(made) <= {".hydra"}, made


def test_tensorboard_without_its_package_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if it were not installed
    args = ["logger=tensorboard", "steps=1", "hydra.run.dir=run"]
    code, lines, output = run_entry(cli.train_main, args, capsys)
    assert_refused("ddpm-train", code, lines, output, args)
    assert lines[0] == (
        "ddpm-train: error: logger=tensorboard needs the tensorboard package: "
        "pip install -e '.[tensorboard]' in the ddpm checkout"
    )
    assert {p.relative_to(tmp_path / "run").parts[0] for p in (tmp_path / "run").rglob("*")} <= {".hydra"}


BAD_SAMPLE = [
    (["ckpt=nope.pt"], "ckpt=nope.pt does not exist"),
    (["ckpt=junk.pt"], "ckpt=junk.pt is not a readable checkpoint"),
    ([], "ckpt is required"),
    (["ckpt=junk.pt", "n=0"], "n=0 is invalid"),
    (["ckpt=junk.pt", "sampler=euler"], "sampler='euler' is invalid: choose one of ddpm, ddim, dpm_solver++"),
    (["ckpt=junk.pt", "sample_steps=-3"], "sample_steps=-3 is invalid"),
    (["ckpt=junk.pt", "timestep_spacing=uniform"], "expected one of [linspace, leading, trailing]"),
    (["ckpt=junk.pt", "samplers=ddim"], "Key 'samplers' not in 'SampleConfig'"),
    (["ckpt=tiny.pt", "gif=true", "gif_frames=1"], "gif_frames=1 is invalid: it must be >= 2"),
    (["ckpt=tiny.pt", "gif_frame_ms=5"], "gif_frame_ms=5 is invalid: it must be >= 10"),
]


@pytest.mark.parametrize(("args", "message"), BAD_SAMPLE, ids=[" ".join(a) or "none" for a, _ in BAD_SAMPLE])
def test_bad_sample_input_is_one_line(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    (tmp_path / "tiny.pt").symlink_to(FIXTURES / "tiny_v2.pt")
    code, lines, output = run_entry(cli.sample_main, [*args, "out=out_bad"], capsys)
    assert_refused("ddpm-sample", code, lines, output, args)
    assert code == 2 and message in lines[0]
    assert not (tmp_path / "out_bad").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give exactly one of ckpt=PATH"),
        (["ckpt=nope.pt"], "ckpt=nope.pt does not exist"),
        (["samples=pics"], "samples=DIR needs data="),
        (
            ["ckpt=tiny.pt", "features=[inception]", "inception_weights=missing.pth"],
            "inception_weights=missing.pth does not exist",
        ),
    ],
)
def test_bad_eval_input_is_one_line(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.pt").symlink_to(FIXTURES / "tiny_v2.pt")
    code, lines, output = run_entry(cli.eval_main, [*args, "n=4", "n_real=4", "out=eval_bad"], capsys)
    assert_refused("ddpm-eval", code, lines, output, args)
    assert code == 2 and message in lines[0]
    assert not (tmp_path / "eval_bad").exists()
