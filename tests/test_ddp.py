"""Data-parallel training: two gloo ranks on the CPU, through torchrun and through the step itself."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from conftest import BIN, TINY, assert_refused, compose, logged_steps, run_entry, start, wait_for_step

from ddpm import cli
from ddpm.checkpoint import load_checkpoint
from ddpm.data.batch import Batch
from ddpm.diffusion.gaussian import Diffusion
from ddpm.models import build_model
from ddpm.runtime import Runtime
from ddpm.training.step import StepOptions, TrainStep, build_optimizer

pytestmark = pytest.mark.slow

TORCHRUN = ("torchrun", "--standalone", "--nproc-per-node=2", "--no-python", str(BIN / "ddpm-train"))
# Dropout, flips, warm-up, EMA: what draws or keeps state across steps (no cosine decay: the run cut
# short is started with more steps, so that a signal is sure to land in time, and the decay depends on
# them). 1,797 digits make 112 batches of 16 an epoch, so the data order is not what is tested here.
DDP = TINY + [
    "steps=16",
    "timesteps=20",
    "model.dropout=0.1",
    "data.hflip=true",
    "lr_warmup=2",
    "lr_decay=none",
    "checkpoint_every=4",
    "sample_every=0",
    "forward_n=0",
    "dist_timeout=60",
]


# ------------------------------------------------------------------------------- the step, in process
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


VARIANTS = {
    "unconditional": [],
    "conditional": ["class_cond=true", "cond_drop_prob=0.5"],  # labels dropped by the (seed, step) mask
    "learned": ["learn_sigma=true"],  # the hybrid loss, its L_vlb term through the variance channels
}


def one_step(
    overrides: list[str], rank: int = 0, world: int = 1, ddp: bool = False, variant: str = "unconditional"
) -> torch.nn.Module:
    """Step 1's gradient on this rank's slice of a fixed global batch, into the model's .grad."""
    cfg = compose("train", TINY + ["timesteps=50", *VARIANTS[variant], *overrides])
    num_classes = 10 if cfg.class_cond else None
    torch.manual_seed(0)
    model = build_model(cfg.model, 1, 8, num_classes, cfg.learn_sigma)
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    runtime = Runtime(torch.device("cpu"), rank=rank, world_size=world)
    optimizer = build_optimizer(model, cfg.lr, runtime.device)
    opts = StepOptions.from_config(cfg, num_classes)
    step = TrainStep(model, net, optimizer, Diffusion.from_config(cfg), None, opts, runtime)
    x0 = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    step.optimize(step.draws(1, Batch(x0, torch.arange(16) % 10).shard(rank, world)))
    return model


def rank_gradients(rank: int, world: int, port: int, out: str, variant: str) -> None:
    """One rank's share of one step under DistributedDataParallel; rank 0 saves the averaged gradient."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = one_step(["grad_accum=2"], rank, world, ddp=True, variant=variant)
    if rank == 0:
        torch.save([p.grad for p in model.parameters()], out)
    dist.destroy_process_group()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_ranks_average_the_gradient_that_one_process_computes(tmp_path, variant):
    out = tmp_path / "grads.pt"
    mp.spawn(rank_gradients, args=(2, free_port(), str(out), variant), nprocs=2)
    alone = [p.grad for p in one_step([], variant=variant).parameters()]
    scale = max(g.abs().max().item() for g in alone)
    # the same sums in another order (per rank, then averaged): equal to float32 rounding of the sums
    for a, b in zip(torch.load(out), alone, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)


# ---------------------------------------------------------------------------- through torchrun
def workers(launcher: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes."""
    found: dict[int, int] = {}
    deadline = time.monotonic() + 60
    while len(found) < 2 and time.monotonic() < deadline:
        children = subprocess.run(
            ["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True
        ).stdout.split()
        for pid in map(int, children):
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            ranks = [e for e in environ if e.startswith(b"RANK=")]
            if ranks:
                found[int(ranks[0][5:])] = pid
        time.sleep(0.05)
    return found


def run_torchrun(*args: str, cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    command = (TORCHRUN[0], TORCHRUN[1], f"--nproc-per-node={nproc}", *TORCHRUN[3:])
    proc = start(*args, cwd=cwd, command=command)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_two_ranks_write_one_run_stop_together_and_resume_exactly(tmp_path, cli):
    whole = run_torchrun(*DDP, "hydra.run.dir=whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    assert whole.stdout.count("done: 16 steps") == 1  # only the main rank reports
    assert sorted(p.name for p in tmp_path.iterdir()) == ["whole"]  # one run directory
    assert logged_steps(tmp_path / "whole") == list(range(1, 17))  # one row per step
    hydra = tmp_path / "whole/.hydra"
    assert sorted(p.name for p in hydra.iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert yaml.safe_load((hydra / "config.yaml").read_text())["model"]["dropout"] == 0.1

    # SIGTERM to rank 1 alone: both ranks stop after the same step, with one checkpoint
    proc = start(*DDP, "steps=400", "hydra.run.dir=cut", cwd=tmp_path, command=TORCHRUN)
    wait_for_step(proc, tmp_path / "cut", 3)
    os.kill(workers(proc)[1], signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    stopped = [line for line in err.splitlines() if "stopped by SIGTERM at step" in line]
    assert len(stopped) == 2, err  # each rank says so, at the same step
    step = int(stopped[0].split("at step ")[1].split()[0])
    assert all(f"at step {step} of 400" in line for line in stopped) and step < 16
    assert load_checkpoint(tmp_path / "cut/checkpoints/last.pt")["step"] == step

    # resumed on two ranks, it ends where the uninterrupted run ended, bit for bit
    resumed = run_torchrun("hydra.run.dir=cut", "resume=auto", "steps=16", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a, b = (load_checkpoint(tmp_path / r / "checkpoints/last.pt") for r in ("whole", "cut"))
    assert a["step"] == b["step"] == 16
    assert same(a["model"], b["model"]) and same(a["ema"], b["ema"])
    assert logged_steps(tmp_path / "cut") == list(range(1, 17))

    # a two-rank checkpoint resumes on one process
    alone = cli(
        "ddpm-train",
        f"resume={tmp_path / 'whole/checkpoints/step_000012.pt'}",
        "hydra.run.dir=one",
        cwd=tmp_path,
    )
    assert alone.returncode == 0, alone.stderr
    one = load_checkpoint(tmp_path / "one/checkpoints/last.pt")["model"]
    # The same data, t and eps; only dropout draws per rank, so the weights differ a little.
    distance = torch.linalg.vector_norm(torch.cat([(a["model"][k] - one[k]).flatten() for k in one]))
    size = torch.linalg.vector_norm(torch.cat([one[k].flatten() for k in one]))
    assert 0 < distance / size < 0.05


@pytest.mark.parametrize(
    ("extra", "terms"),
    [
        (["class_cond=true", "cond_drop_prob=0.5"], ["loss"]),
        (["learn_sigma=true"], ["loss", "loss_simple", "loss_vlb"]),  # the hybrid loss's two terms too
    ],
    ids=["conditional", "learned"],
)
def test_a_run_on_two_ranks_trains_as_one_process_does(tmp_path, cli, extra, terms):
    # no dropout: its draws are per rank; everything else (t, eps, the label-drop mask) is per step
    args = [*DDP, "model.dropout=0", "steps=3", *extra]
    two = run_torchrun(*args, "hydra.run.dir=two", cwd=tmp_path)
    assert two.returncode == 0, two.stderr
    one = cli("ddpm-train", *args, "hydra.run.dir=one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    rows = {
        r: [json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
        for r in ("one", "two")
    }
    for term in terms:
        losses = {r: [row[term] for row in rows[r] if "loss" in row] for r in rows}
        assert len(losses["one"]) == 3
        # step 1 is the same sums in another order; later steps also carry Adam's first, sign-like updates
        assert losses["two"][0] == pytest.approx(losses["one"][0], rel=1e-5), term
        assert losses["two"] == pytest.approx(losses["one"], rel=1e-3), term
    ckpts = [load_checkpoint(tmp_path / r / "checkpoints/last.pt") for r in rows]
    if "class_cond=true" in extra:
        assert [c["class_names"] for c in ckpts] == [list("0123456789")] * 2
    else:  # both write a learn_sigma checkpoint, which samples with its learned variance
        assert all(c["config"]["learn_sigma"] for c in ckpts)
        sampled = cli("ddpm-sample", f"ckpt={tmp_path / 'two/checkpoints/last.pt'}", "n=4", cwd=tmp_path)
        assert sampled.returncode == 0, sampled.stderr
        assert "ddpm with 20 steps, learned variance)" in sampled.stdout


def test_a_rank_that_dies_ends_the_job(tmp_path):
    proc = start(*DDP, "steps=100000", "hydra.run.dir=run", cwd=tmp_path, command=TORCHRUN)
    wait_for_step(proc, tmp_path / "run", 2)
    os.kill(workers(proc)[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)  # no collective waits for ever
    assert proc.returncode != 0
    assert "ddpm-train (rank 0 of 2): error: the other ranks stopped answering" in err, err


# ----------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["steps=1"], "hydra.run.dir is required under torchrun (WORLD_SIZE=2)"),
        (["-m", "loss=l1,l2", "hydra.run.dir=x"], "-m is refused under torchrun"),
        (["batch_size=15", "hydra.run.dir=run"], "batch_size=15 is invalid for 2 ranks and grad_accum=1"),
        (
            ["batch_size=12", "grad_accum=4", "hydra.run.dir=run"],
            "batch_size=12 is invalid for 2 ranks and grad_accum=4: each rank takes batch_size / 2 images",
        ),
    ],
)
def test_what_torchrun_cannot_run_is_refused_before_any_work(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    flags = [a for a in args if a.startswith("-")]  # Hydra's own, before the overrides
    overrides = [a for a in args if not a.startswith("-")]
    code, lines, output = run_entry(cli.train_main, [*flags, *TINY, *overrides], capsys)
    assert_refused("ddpm-train (rank 0 of 2)", code, lines, output, args)
    assert message in lines[0]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "run" / "checkpoints").exists()
