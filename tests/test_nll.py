"""ddpm-eval nll=true end to end: the bound in eval.json, which images it is measured on (a test split, the
training images, a folder at the checkpoint's shape), and every refusal."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from conftest import TINY, compose
from PIL import Image

from ddpm.training.loop import train

NLL = ["nll=true", "features=[]", "nll_n=12", "device=cpu"]
KEYS = {"bpd", "bpd_se", "prior_bpd", "decoder_bpd", "n", "split", "T", "variance", "weights"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny digits checkpoint with T = 20, so that the bound's 20 passes take a moment."""
    run = tmp_path_factory.mktemp("nll") / "run"
    train(compose("train", TINY + ["steps=2", "timesteps=20", "sample_every=0", "forward_n=0"]), run)
    return run / "checkpoints" / "last.pt"


def eval_json(out):
    return json.loads((out / "eval.json").read_text())


def test_the_bound_alone_draws_no_samples(in_process, ckpt, tmp_path):
    out = tmp_path / "out"
    result = in_process("ddpm-eval", f"ckpt={ckpt}", *NLL, f"out={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = eval_json(out)
    nll = report["nll"]
    assert set(nll) == KEYS and "features" not in report and not (out / "samples.png").exists()
    assert nll["n"] == 12 and nll["split"] == "train" and nll["T"] == 20  # digits have no test split
    assert nll["variance"] == "small" and nll["weights"] == "ema"
    assert 0 < nll["prior_bpd"] < nll["bpd"] and nll["decoder_bpd"] > 0 and nll["bpd_se"] > 0
    assert "NLL <= " in result.stdout and "bits/dim on 12 train images" in result.stdout
    again = tmp_path / "again"
    assert in_process("ddpm-eval", f"ckpt={ckpt}", *NLL, f"out={again}", cwd=tmp_path).returncode == 0
    assert eval_json(again)["nll"] == nll  # the seed fixes the images and every x_t


def test_the_variance_and_the_seed_change_the_bound(in_process, ckpt, tmp_path):
    bpd = {}
    for name, extra in [("small", []), ("large", ["ddpm_variance=large"]), ("seed", ["seed=1"])]:
        out = tmp_path / name
        assert (
            in_process("ddpm-eval", f"ckpt={ckpt}", *NLL, *extra, f"out={out}", cwd=tmp_path).returncode == 0
        )
        bpd[name] = eval_json(out)["nll"]
    assert bpd["large"]["variance"] == "large" and bpd["large"]["bpd"] != bpd["small"]["bpd"]
    assert bpd["large"]["prior_bpd"] == bpd["small"]["prior_bpd"]  # the prior term has no model in it
    assert bpd["seed"]["bpd"] != bpd["small"]["bpd"]


def test_the_bound_beside_the_scores(in_process, ckpt, tmp_path):
    out = tmp_path / "out"
    args = [
        "features=[pixels]",
        "n=70",
        "n_real=100",
        "kid_subsets=2",
        "kid_subset_size=50",
        "sample_steps=3",
    ]
    result = in_process("ddpm-eval", f"ckpt={ckpt}", *NLL, *args, f"out={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = eval_json(out)
    assert report["nll"]["n"] == 12 and "pixels" in report["features"] and (out / "samples.png").is_file()


def test_a_conditional_bound_is_given_each_image_its_label(in_process, cond_ckpt, tmp_path):
    out = tmp_path / "out"
    result = in_process("ddpm-eval", f"ckpt={cond_ckpt}", *NLL, f"out={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert eval_json(out)["nll"]["n"] == 12


def write_idx(raw, prefix, images, labels):
    """The MNIST idx-ubyte format: big-endian magic, dimensions, then the bytes."""
    raw.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, h, w) + images.tobytes())
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


def test_auto_takes_the_test_split_where_there_is_one(in_process, ckpt, tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in [("train", 9), ("t10k", 4)]:
        images = rng.integers(0, 256, (n, 8, 8), dtype=np.uint8)
        write_idx(tmp_path / "MNIST" / "raw", prefix, images, np.arange(n, dtype=np.uint8))
    data = ["data=mnist", f"data.root={tmp_path}", "data.download=false", "data.image_size=8"]
    for split, n in [("auto", 4), ("test", 4), ("train", 9)]:
        out = tmp_path / split
        args = [f"ckpt={ckpt}", *NLL, *data, f"nll_split={split}", f"out={out}"]
        result = in_process("ddpm-eval", *args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        nll = eval_json(out)["nll"]
        assert (nll["split"], nll["n"]) == ("test" if split != "train" else "train", n)  # all there are


def test_a_folder_is_read_at_the_checkpoints_shape(in_process, ckpt, tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "real"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "out"
    args = [f"ckpt={ckpt}", *NLL, "data=folder", f"data.root={folder}", f"out={out}"]
    result = in_process("ddpm-eval", *args, cwd=tmp_path)  # the folder's defaults are 64x64x3; the ckpt 8x8x1
    assert result.returncode == 0, result.stderr
    assert eval_json(out)["nll"]["n"] == 5
    wrong = in_process("ddpm-eval", *args, "data.image_size=16", cwd=tmp_path)
    assert wrong.returncode == 2 and "is (1, 16, 16), but ckpt=" in wrong.stderr


def test_a_folder_of_16_bit_images_is_refused(in_process, ckpt, tmp_path):
    folder = tmp_path / "wide"
    folder.mkdir()
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(folder / "deep.png")
    out = tmp_path / "out"
    result = in_process(
        "ddpm-eval", f"ckpt={ckpt}", *NLL, "data=folder", f"data.root={folder}", f"out={out}", cwd=tmp_path
    )
    assert result.returncode == 2
    assert "deep.png has more than 8 bits per channel (PIL mode I;16)" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nll_split=test"], "nll_split=test: data=digits has no test split; choose nll_split=train"),
        (["nll_split=val"], "nll_split"),
        (["nll_n=0"], "nll_n=0 is invalid"),
        (["nll=false"], "features=[] scores nothing"),
    ],
)
def test_bad_nll_input(in_process, ckpt, tmp_path, args, message):
    out = tmp_path / "out"
    result = in_process("ddpm-eval", f"ckpt={ckpt}", *NLL, *args, f"out={out}", cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_a_folder_of_samples_has_no_likelihood(in_process, tmp_path):
    result = in_process("ddpm-eval", f"samples={tmp_path}", "data=digits", *NLL, cwd=tmp_path)
    assert result.returncode == 2 and "nll=true needs ckpt=PATH" in result.stderr


RUN = TINY + ["steps=3", "timesteps=20", "sample_every=0", "forward_n=0", "eval.nll_n=10"]


def test_a_run_bounds_its_likelihood_at_each_score(tmp_path, capsys):
    """eval.nll=true with eval.features=[]: the bound alone, at eval_every and at the end, into eval.json,
    metrics.jsonl, loss.png, the score line and the sweep summary."""
    from ddpm.summary import summarise

    run = tmp_path / "run"
    train(
        compose("train", RUN + ["eval.nll=true", "eval.features=[]", "eval_every=2", "eval_at_end=true"]), run
    )
    output = capsys.readouterr().out
    assert "eval: the bound in bits/dim on 10 train images (small)" in output
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in rows if "bpd" in r]
    assert [r["step"] for r in scored] == [2, 3] and all(r["bpd"] > 0 and r["bpd_se"] > 0 for r in scored)
    report = json.loads((run / "eval" / "step_000003" / "eval.json").read_text())
    assert report["nll"]["bpd"] == scored[-1]["bpd"] and report["nll"]["n"] == 10
    assert not (run / "eval" / "step_000003" / "samples.png").exists()  # no samples were drawn
    assert "NLL <= " in output and Image.open(run / "loss.png").size[0] > 1000  # three panels
    assert summarise(tmp_path)[0][0].bpd == scored[-1]["bpd"]


def test_a_run_refuses_a_test_split_its_set_has_not(tmp_path):
    from ddpm.errors import ConfigError

    with pytest.raises(ConfigError, match="eval.nll_split=test: data=digits has no test split"):
        train(compose("train", RUN + ["eval.nll=true", "eval.nll_split=test"]), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_variance_sweep_ends_in_a_table_of_bounds(ckpt, tmp_path, monkeypatch, capsys):
    from conftest import run_entry

    from ddpm import cli

    monkeypatch.chdir(tmp_path)
    args = ["-m", f"ckpt={ckpt}", *NLL, "ddpm_variance=small,large", "out=out${hydra:job.num}"]
    code, _, output = run_entry(cli.eval_main, [*args, "hydra.sweep.dir=sweep"], capsys)
    assert code == 0, output
    lines = (tmp_path / "sweep" / "sweep.md").read_text().splitlines()
    assert "| bpd | bpd_se | variance |" in lines[0] and len(lines) == 4
    small = json.loads((tmp_path / "out0" / "eval.json").read_text())["nll"]
    assert any(f"{small['bpd']:.4g}" in line and "small" in line for line in lines[2:])


@pytest.mark.parametrize("name", ["tiny_v2.pt", "tiny_v2.safetensors"])
def test_an_old_checkpoint_gets_its_bound(in_process, tmp_path, name):
    from conftest import FIXTURES

    out = tmp_path / "out"
    args = [f"ckpt={FIXTURES / name}", *NLL, "data=digits", f"out={out}"]
    result = in_process("ddpm-eval", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    nll = eval_json(out)["nll"]
    assert nll["n"] == 12 and nll["bpd"] > nll["prior_bpd"] > 0
