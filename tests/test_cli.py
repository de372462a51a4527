"""The console scripts as a user runs them: in subprocesses, and, where only the command's own work is at
stake, through the same entry points in this process."""

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import TINY, cheap_eval
from PIL import Image

# one worker runs them all, so the module's trained run is made once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("cli")]

QUICK = TINY + ["sample_every=0", "checkpoint_every=0"]


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny run of the design card's `ddpm-train loss=huber timesteps=200`."""
    cwd = tmp_path_factory.mktemp("train")
    from conftest import run_cli

    result = run_cli(
        "ddpm-train",
        "loss=huber",
        "timesteps=200",
        "steps=3",
        "checkpoint_every=2",
        "sample_every=2",
        *TINY,
        "hydra.run.dir=run",
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr
    assert "done: 3 steps" in result.stdout
    return cwd / "run"


def test_train_log_holds_what_the_run_printed_with_times(trained):
    lines = (trained / "train.log").read_text().splitlines()
    stamp = r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} "
    assert all(re.match(stamp, line) for line in lines), lines
    assert lines[0][20:].startswith("ddpm-train | data digits 8x8x1")
    assert any(line[20:].startswith("step 2/3 | loss ") for line in lines)
    assert any(line[20:].startswith("step 2: checkpoint -> ") for line in lines)
    assert lines[-1][20:].startswith("done: 3 steps")


def test_train_writes_checkpoints_grids_forward_and_metrics(trained):
    assert files_under(trained) == [
        ".hydra/config.yaml",
        ".hydra/hydra.yaml",
        ".hydra/overrides.yaml",
        "checkpoints/last.pt",
        "checkpoints/step_000002.pt",
        "checkpoints/step_000003.pt",
        "forward.png",
        "loss.png",
        "metrics.jsonl",
        "samples/step_000002.png",
        "samples/step_000003.png",
        "train.log",
    ]
    recorded = yaml.safe_load((trained / ".hydra/config.yaml").read_text())
    assert recorded["loss"] == "huber" and recorded["timesteps"] == 200


def test_sample_writes_grid_and_images_and_repeats_by_seed(trained, in_process):
    cwd = trained.parent
    ckpt = "run/checkpoints/last.pt"
    first = in_process(
        "ddpm-sample", f"ckpt={ckpt}", "n=6", "seed=3", "out=s1", "save_images=true", "device=cpu", cwd=cwd
    )
    assert first.returncode == 0, first.stderr
    assert files_under(cwd / "s1") == ["grid.png"] + [f"images/{i:05d}.png" for i in range(6)]
    assert Image.open(cwd / "s1/images/00000.png").size == (8, 8)
    grid = Image.open(cwd / "s1/grid.png")
    assert grid.size == (3 * 34 + 2, 2 * 34 + 2)  # 6 samples: 3 x 2 cells of 8 px enlarged to 32

    again = in_process("ddpm-sample", f"ckpt={ckpt}", "n=6", "seed=3", "out=s2", "save_images=true", cwd=cwd)
    other = in_process("ddpm-sample", f"ckpt={ckpt}", "n=6", "seed=4", "out=s3", "save_images=true", cwd=cwd)
    assert again.returncode == other.returncode == 0
    pixels = {
        d: [np.asarray(Image.open(cwd / d / f"images/{i:05d}.png")) for i in range(6)]
        for d in ["s1", "s2", "s3"]
    }
    assert all(np.array_equal(a, b) for a, b in zip(pixels["s1"], pixels["s2"], strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(pixels["s1"], pixels["s3"], strict=True))


def test_sample_gif_goes_from_noise_to_the_grid(trained, in_process):
    cwd = trained.parent
    common = ["ckpt=run/checkpoints/last.pt", "n=6", "seed=3", "gif=true", "device=cpu"]
    result = in_process("ddpm-sample", *common, "gif_frames=5", "gif_frame_ms=30", "out=g1", cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert files_under(cwd / "g1") == ["denoise.gif", "grid.png"]
    assert "g1/denoise.gif (5 frames)" in result.stdout
    grid = Image.open(cwd / "g1/grid.png")
    with Image.open(cwd / "g1/denoise.gif") as gif:
        assert gif.n_frames == 5 and gif.size == grid.size and gif.info["loop"] == 0
        frames, durations = [], []
        for i in range(gif.n_frames):
            gif.seek(i)
            frames.append(np.asarray(gif.convert("L"), dtype=np.int16))
            durations.append(gif.info["duration"])
    assert durations == [30, 30, 30, 30, 2000]  # the result stays in view
    cells = frames[0][2:34, 2:34]  # the first 8x8 sample, enlarged to 32x32 inside the padding
    assert cells.std() > 80  # x_T: N(0, 1) clipped to [-1, 1] is about 100 grey levels wide
    assert np.array_equal(frames[-1], np.asarray(grid.convert("L"), dtype=np.int16))

    # at most one frame per sampler step: 10 steps visit 11 states
    steps = ["sampler=ddim", "sample_steps=10", "gif_frames=40", "out=g2"]
    assert in_process("ddpm-sample", *common, *steps, cwd=cwd).returncode == 0
    with Image.open(cwd / "g2/denoise.gif") as gif:
        assert gif.n_frames == 11


def test_export_to_safetensors_samples_the_same_images(trained, in_process):
    cwd = trained.parent
    exported = in_process(
        "ddpm-export", "ckpt=run/checkpoints/last.pt", "out=shared/tiny.safetensors", cwd=cwd
    )
    assert exported.returncode == 0, exported.stderr
    assert "EMA weights of run/checkpoints/last.pt (step 3)" in exported.stdout
    grids = []
    for ckpt in ("run/checkpoints/last.pt", "shared/tiny.safetensors"):
        out = f"from_{Path(ckpt).suffix[1:]}"
        result = in_process(
            "ddpm-sample", f"ckpt={ckpt}", "n=4", "seed=1", f"out={out}", "device=cpu", cwd=cwd
        )
        assert result.returncode == 0, result.stderr
        grids.append(np.asarray(Image.open(cwd / out / "grid.png")))
    assert np.array_equal(*grids)
    refused = in_process("ddpm-train", "resume=shared/tiny.safetensors", cwd=cwd)
    assert refused.returncode == 2 and "holds weights only" in refused.stderr
    bad = in_process("ddpm-export", "ckpt=run/checkpoints/last.pt", "out=x.pt", cwd=cwd)
    assert (
        bad.returncode == 2 and "out=x.pt is invalid: give a file name ending in .safetensors" in bad.stderr
    )


def test_sample_with_ddim_and_dpm_solver_and_without_ema(trained, in_process):
    cwd = trained.parent
    common = ["ckpt=run/checkpoints/last.pt", "n=4", "save_images=true"]
    runs = {
        "ddim": ["sampler=ddim", "sample_steps=50", "eta=0.5"],
        "dpm": ["sampler=dpm_solver++", "sample_steps=20", "timestep_spacing=trailing"],
        "ema": [],
        "raw": ["ema=false"],
    }
    for name, extra in runs.items():
        result = in_process("ddpm-sample", *common, *extra, f"out={name}", cwd=cwd)
        assert result.returncode == 0, result.stderr
    assert (
        "ddim with 50 steps" in in_process("ddpm-sample", *common, *runs["ddim"], "out=ddim", cwd=cwd).stdout
    )
    pixels = {k: np.asarray(Image.open(cwd / k / "images/00000.png")) for k in runs}
    assert not np.array_equal(pixels["ema"], pixels["raw"])
    assert not np.array_equal(pixels["ddim"], pixels["dpm"])


def test_sample_steps_are_at_most_t_and_the_output_says_how_many(trained, in_process):
    cwd = trained.parent
    common = ["ckpt=run/checkpoints/last.pt", "n=2", "device=cpu"]
    default = in_process("ddpm-sample", *common, "out=d", cwd=cwd)
    assert default.returncode == 0, default.stderr
    assert "ddpm with 100 steps" in default.stdout  # the default, under T=200
    many = in_process("ddpm-sample", *common, "sample_steps=5000", "out=many", cwd=cwd)
    every = in_process("ddpm-sample", *common, "sample_steps=null", "out=every", cwd=cwd)
    assert many.returncode == every.returncode == 0, many.stderr + every.stderr
    assert "ddpm with 200 steps" in many.stdout and "ddpm with 200 steps" in every.stdout
    assert np.array_equal(*(np.asarray(Image.open(cwd / d / "grid.png")) for d in ("many", "every")))


def test_sample_default_output_is_beside_the_run(trained, in_process):
    result = in_process("ddpm-sample", "ckpt=run/checkpoints/step_000002.pt", "n=2", cwd=trained.parent)
    assert result.returncode == 0, result.stderr
    assert (trained / "generated/step_000002_seed0/grid.png").is_file()
    assert not (trained / "generated/step_000002_seed0/images").exists()


def test_multirun_sweeps_each_job_into_its_own_folder(tmp_path, cli):
    sweep = ["-m", "loss=l1,l2,huber", "steps=2", *QUICK, *cheap_eval(tmp_path / "cache")]
    result = cli("ddpm-train", *sweep, "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # the classifier the jobs score with is trained once, before the launcher starts them
    assert result.stdout.count("eval classifier ready: ") == 1
    assert result.stdout.index("eval classifier ready: ") < result.stdout.index("Launching 3 jobs")
    assert len(list((tmp_path / "cache").glob("ddpm_classifier_*.pt"))) == 1
    jobs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert len(jobs) == 3
    for i, (job, loss) in enumerate(zip(jobs, ["l1", "l2", "huber"], strict=True)):
        assert job.startswith(f"{i}_") and f"loss={loss}" in job
        # named after what changes the weights; keys marked resumable(named=False) stay out (keys.py)
        assert "batch_size=16" in job and "steps=" not in job and "device=" not in job, job
        assert (tmp_path / "sweep" / job / "checkpoints/last.pt").is_file()
        assert (tmp_path / "sweep" / job / "samples/step_000002.png").is_file()
        assert yaml.safe_load((tmp_path / "sweep" / job / ".hydra/config.yaml").read_text())["loss"] == loss
    # the sweep ends in a summary, one row per job, labelled by what sets it apart
    rows = list(csv.DictReader((tmp_path / "sweep/summary.csv").open()))
    assert {r["overrides"] for r in rows} == {"loss=l1", "loss=l2", "loss=huber"}
    # each job scored itself at its end (eval_at_end is on in multirun jobs): best FID first
    fids = [float(r["fid"]) for r in rows]
    assert fids == sorted(fids) and all(float(r["final_loss"]) > 0 for r in rows)
    assert (tmp_path / "sweep/summary.png").is_file() and "sweep summary ->" in result.stdout


def test_train_on_a_folder_of_images(tmp_path, cli):
    rng = np.random.default_rng(0)
    (tmp_path / "pics" / "nested").mkdir(parents=True)
    for i in range(20):
        folder = tmp_path / "pics" / ("nested" if i % 2 else "")
        Image.fromarray(rng.integers(0, 255, (24, 20 + i, 3), dtype=np.uint8)).save(folder / f"{i}.PNG")
    result = cli(
        "ddpm-train",
        "data=folder",
        "data.root=pics",
        "data.image_size=16",
        "data.num_workers=0",
        "data.on_device=false",
        "steps=2",
        *QUICK,
        "hydra.run.dir=run",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "data folder 16x16x3 (20 images, DataLoader, 0 workers)" in result.stdout
    assert Image.open(tmp_path / "run/samples/step_000002.png").mode == "RGB"


def test_a_sweep_over_folders_names_each_job_in_one_folder(tmp_path, cli):
    """A path in a swept value (data.root=pics/a) is spelled with _ in the job's folder name, not nested."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "pics" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
                tmp_path / f"pics/{name}/{i}.png"
            )
    folder = ["data=folder", "data.image_size=8", "data.num_workers=0", "batch_size=4", "eval_at_end=false"]
    sweep = ["-m", "data.root=pics/a,pics/b", "steps=1", *QUICK, *folder, "hydra.sweep.dir=sweep"]
    result = cli("ddpm-train", *sweep, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert [p.name[:2] for p in jobs] == ["0_", "1_"]
    for job, name in zip(jobs, ("a", "b"), strict=True):
        assert f"data.root=pics_{name}" in job.name and (job / "checkpoints/last.pt").is_file()
        assert yaml.safe_load((job / ".hydra/config.yaml").read_text())["data"]["root"] == f"pics/{name}"


def test_full_error_shows_the_trace(tmp_path, cli):
    result = cli(
        "ddpm-train", "timesteps=0", "hydra.run.dir=run", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"}
    )
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr


def test_non_editable_install_finds_its_configs_from_any_folder(tmp_path):
    """Build the wheel, install it into a fresh folder, and train from a folder far from the sources."""
    root = Path(__file__).resolve().parents[1]
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run(
        [*pip, "wheel", "--no-deps", "-w", str(tmp_path / "dist"), str(root)], capture_output=True, text=True
    )
    assert built.returncode == 0, built.stderr
    # every folder is declared as a package, so setuptools has nothing to warn about
    assert "Warning" not in built.stdout + built.stderr
    wheel = next((tmp_path / "dist").glob("ddpm_hydra-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import sys, ddpm; assert ddpm.__file__.startswith(sys.argv[1]), ddpm.__file__;"
        "from ddpm.cli import train_main; sys.argv = ['ddpm-train', *sys.argv[2:]]; train_main()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "site"), "steps=1", *QUICK, "hydra.run.dir=run"],
        cwd=elsewhere,
        env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert (elsewhere / "run/checkpoints/last.pt").is_file()


def test_help_lists_the_groups_and_keys(tmp_path, cli):
    result = cli("ddpm-train", "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "schedule: cosine, given, linear, quadratic, sigmoid" in result.stdout
    assert "data: cifar10, digits, fashion_mnist, folder, mnist" in result.stdout
    assert "timesteps: 200" in result.stdout
    assert not (tmp_path / "runs").exists()


def test_config_dir_adds_user_configs(tmp_path, cli):
    (tmp_path / "mine" / "model").mkdir(parents=True)
    (tmp_path / "mine" / "model" / "small.yaml").write_text("defaults:\n  - unet\n  - _self_\ndim: 12\n")
    result = cli("ddpm-train", "--config-dir", "mine", "model=small", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["model"]["dim"] == 12


def test_eval_scores_a_checkpoint(trained, in_process):
    cwd = trained.parent
    args = [
        "ckpt=run/checkpoints/last.pt",
        "n=20",
        "n_real=100",
        "classifier_steps=20",
        "kid_subsets=3",
        "kid_subset_size=10",
        "sampler=ddim",
        "sample_steps=5",
        "classifier_cache=cache",
    ]
    result = in_process("ddpm-eval", *args, cwd=cwd)
    assert result.returncode == 0, result.stderr
    report = json.loads((trained / "eval/last_seed0/eval.json").read_text())
    assert report["source"]["step"] == 3 and report["n_fake"] == 20
    assert "classifier (classifier accuracy" in result.stdout and "KID" in result.stdout
    assert "FID needs more images than the 128 features" in result.stdout
    assert (cwd / "cache").is_dir()
