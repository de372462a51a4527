import inspect
import json
import math

import pytest
import torch
from conftest import TINY

from ddpm.checkpoint import load_checkpoint
from ddpm.data.batch import Batch
from ddpm.diffusion.gaussian import Diffusion
from ddpm.errors import ConfigError
from ddpm.runtime import resolve_device
from ddpm.training.loop import train
from ddpm.training.step import step_draws, step_seed


def test_train_writes_the_run_directory(compose_cfg, tmp_path):
    constant = ["lr=1e-3", "lr_warmup=0", "lr_decay=none"]
    cfg = compose_cfg(
        "train", TINY + ["steps=4", "sample_every=2", "checkpoint_every=3", "timesteps=20", *constant]
    )
    summary = train(cfg, tmp_path)
    names = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert names == [
        "checkpoints/last.pt",
        "checkpoints/step_000003.pt",
        "checkpoints/step_000004.pt",
        "forward.png",
        "loss.png",
        "metrics.jsonl",
        "samples/step_000002.png",
        "samples/step_000004.png",
        "train.log",
    ]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all({"step", "loss", "lr", "img_per_s"} <= set(r) and r["lr"] == 1e-3 for r in rows)
    assert summary["steps"] == 4 and summary["final_loss"] == rows[-1]["loss"]
    assert load_checkpoint(tmp_path / "checkpoints/last.pt")["step"] == 4


def test_metrics_report_the_gradient_norm_and_the_loss_by_timestep_quartile(compose_cfg, tmp_path):
    from PIL import Image

    cfg = compose_cfg(
        "train", TINY + ["steps=3", "timesteps=20", "batch_size=64", "sample_every=0", "log_every=3"]
    )
    train(cfg, tmp_path)
    (row,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert row["grad_norm"] > 0
    quartiles = [row[f"loss_q{q}"] for q in range(4)]
    assert all(q is not None and q > 0 for q in quartiles)  # 192 draws of t: every quarter is hit
    # the loss weighs every image alike, so it lies between the quartiles' means
    assert min(quartiles) <= row["loss"] <= max(quartiles)
    image = Image.open(tmp_path / "loss.png")
    assert image.format == "PNG" and image.size[0] >= 800


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


@pytest.mark.slow
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


def make_step(compose_cfg, overrides):
    """The training step of a composed config on a tiny model (on one CPU process)."""
    from ddpm.diffusion.gaussian import Diffusion
    from ddpm.models import build_model
    from ddpm.runtime import Runtime
    from ddpm.training.step import StepOptions, TrainStep, build_optimizer

    cfg = compose_cfg("train", TINY + overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, 1, 8)
    optimizer = build_optimizer(model, 1e-3, torch.device("cpu"))
    opts = StepOptions.from_config(cfg)
    diffusion = Diffusion.from_config(cfg)
    return TrainStep(model, model, optimizer, diffusion, None, opts, Runtime(torch.device("cpu")))


def test_grad_accum_changes_memory_not_the_gradient(compose_cfg):
    # Compared where the computation guarantees agreement: the accumulated gradient, equal up to the
    # order of float32 sums. (Adam-updated weights are not: Adam divides by sqrt(v), which turns the
    # rounding of a near-zero gradient into a full lr-sized step.)
    x0 = Batch(torch.rand(8, 1, 8, 8) * 2 - 1)
    results = []
    for accum in (1, 2, 4):
        train_step = make_step(compose_cfg, [f"grad_accum={accum}", "batch_size=8", "timesteps=50"])
        loss = train_step.optimize(train_step.draws(1, x0))["loss"]
        results.append((loss, [p.grad.clone() for p in train_step.model.parameters()]))
    loss1, grads1 = results[0]
    scale = max(g.abs().max().item() for g in grads1)
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, loss1, rtol=1e-5, atol=0)
        for a, b in zip(grads, grads1, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)


def test_grad_clip_bounds_the_gradient_norm(compose_cfg):
    x0 = Batch(torch.rand(4, 1, 8, 8) * 2 - 1)
    for clip, bounded in ((1e-3, True), (0.0, False)):
        train_step = make_step(compose_cfg, [f"grad_clip={clip}", "batch_size=4", "timesteps=50"])
        metrics = train_step(1, x0)
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in train_step.model.parameters()]))
        assert (norm.item() <= 1e-3 * 1.0001) is bounded
        assert metrics["grad_norm"].item() > 1e-3  # the norm it reports is the one before clipping


def test_offset_noise_adds_a_shared_shift_per_image_and_channel():
    from ddpm.diffusion.gaussian import Diffusion
    from ddpm.diffusion.schedules import Schedule

    schedule = Schedule.from_betas(torch.linspace(1e-4, 0.02, 10))
    g, cpu = torch.Generator().manual_seed(0), torch.device("cpu")
    means = Diffusion(schedule, offset_noise=0.5).noise((4000, 2, 4, 4), g, cpu).mean(dim=(2, 3))
    assert means.var().item() == pytest.approx(0.25 + 1 / 16, rel=0.08)
    plain = Diffusion(schedule).noise((4000, 2, 4, 4), g, cpu)
    assert plain.mean(dim=(2, 3)).var().item() == pytest.approx(1 / 16, rel=0.08)


def test_each_step_draws_its_own_numbers_whatever_came_before():
    from ddpm.diffusion.gaussian import Diffusion
    from ddpm.diffusion.schedules import Schedule

    diffusion = Diffusion(Schedule.from_betas(torch.linspace(1e-4, 0.02, 200)), offset_noise=0.1)
    shape, cpu = (16, 1, 8, 8), torch.device("cpu")
    t1, eps1, _ = step_draws(diffusion, 0, 7, shape, cpu)
    torch.randn(1000)  # other draws in between change nothing
    t2, eps2, _ = step_draws(diffusion, 0, 7, shape, cpu)
    assert torch.equal(t1, t2) and torch.equal(eps1, eps2)
    t3, eps3, _ = step_draws(diffusion, 0, 8, shape, cpu)
    assert not torch.equal(eps1, eps3) and not torch.equal(step_draws(diffusion, 1, 7, shape, cpu)[1], eps1)
    assert step_seed(0, 7) != step_seed(0, 7, 1) and step_seed(0, 7) == step_seed(0, 7)


def test_lr_warmup_and_cosine_decay(compose_cfg, tmp_path):
    from ddpm.training.step import LRDecay, lr_factor

    assert [lr_factor(s, 4, LRDecay.none, 10) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(4, 4, LRDecay.cosine, 10) == 1.0
    assert lr_factor(7, 4, LRDecay.cosine, 10) == pytest.approx(0.5)
    assert lr_factor(10, 4, LRDecay.cosine, 10) == pytest.approx(0.0)
    cfg = compose_cfg(
        "train",
        TINY + ["steps=6", "lr=0.01", "lr_warmup=2", "lr_decay=cosine", "sample_every=0", "forward_n=0"],
    )
    train(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [round(r["lr"], 6) for r in rows] == [0.005, 0.01, 0.01, 0.008536, 0.005, 0.001464]


def test_dropout_is_active_in_training_only(compose_cfg):
    from ddpm.models import build_model

    model = build_model(compose_cfg("train", TINY + ["model.dropout=0.5"]).model, 1, 8)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    model.train()
    assert not torch.equal(model(x, t), model(x, t))
    model.eval()
    assert torch.equal(model(x, t), model(x, t))


@pytest.mark.parametrize(
    "overrides",
    [
        ["objective=x0"],
        ["objective=v", "min_snr_gamma=5"],
        [
            "objective=v",
            "schedule=cosine",
            "schedule.zero_terminal_snr=true",
            "sampler=ddim",
            "sample_steps=10",
        ],
        ["offset_noise=0.1", "sampler=dpm_solver++", "sample_steps=10", "timestep_spacing=trailing"],
        [
            "grad_accum=2",
            "grad_clip=1",
            "lr_warmup=2",
            "lr_decay=cosine",
            "model.dropout=0.1",
            "ddpm_variance=large",
        ],
    ],
)
def test_options_train_and_sample_end_to_end(compose_cfg, tmp_path, overrides):
    cfg = compose_cfg(
        "train", TINY + ["steps=3", "timesteps=20", "sample_every=0", "forward_n=0"] + overrides
    )
    summary = train(cfg, tmp_path)
    assert math.isfinite(summary["final_loss"])
    assert (tmp_path / "samples/step_000003.png").is_file()


def test_the_checkpoint_comes_before_the_grid_and_a_failing_grid_only_warns(
    compose_cfg, tmp_path, monkeypatch, capsys
):
    import ddpm.training.loop

    def broken_sampler(*args, **kwargs):
        raise RuntimeError("sampler fault")

    monkeypatch.setattr(ddpm.training.loop, "generate", broken_sampler)
    cfg = compose_cfg("train", TINY + ["steps=2", "sample_every=1", "checkpoint_every=0", "forward_n=0"])
    summary = train(cfg, tmp_path)
    out = capsys.readouterr().out
    assert summary["steps"] == 2 and load_checkpoint(tmp_path / "checkpoints/last.pt")["step"] == 2
    assert not (tmp_path / "samples").exists()
    warnings = [line for line in out.splitlines() if line.startswith("warning: step")]
    assert len(warnings) == 2 and "RuntimeError: sampler fault" in warnings[1]
    assert f"draw it later with: ddpm-sample ckpt={tmp_path / 'checkpoints/last.pt'}" in warnings[1]
    assert out.index("step 2: checkpoint ->") < out.index("warning: step 2:")


def test_grids_are_drawn_in_batches_of_their_own(compose_cfg, tmp_path, monkeypatch):
    import ddpm.training.loop

    calls = []
    real = ddpm.training.loop.generate

    def spy(trained, sampling, n, seed, batch_size, labels=None):
        calls.append((n, batch_size))
        return real(trained, sampling, n, seed, batch_size, labels)

    monkeypatch.setattr(ddpm.training.loop, "generate", spy)
    overrides = ["steps=1", "timesteps=20", "batch_size=4", "sample_n=6", "sample_batch_size=3"]
    train(compose_cfg("train", TINY + overrides), tmp_path)
    assert calls == [(6, 3)]  # not the training batch of 4


def test_the_loop_body_reaches_the_loss_in_three_calls(compose_cfg, tmp_path, monkeypatch):
    # train_loop -> TrainStep.__call__ -> TrainStep.optimize -> Diffusion.training_losses, so a reader
    # follows a step through loop.py, step.py and gaussian.py
    chains, real = [], Diffusion.training_losses

    def spy(self, *args, **kwargs):
        callers = [frame.function for frame in inspect.stack()[1:]]  # innermost first
        chains.append(callers[: callers.index("train_loop")])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Diffusion, "training_losses", spy)
    train(compose_cfg("train", TINY + ["steps=2", "sample_every=0", "forward_n=0"]), tmp_path)
    assert chains == [["optimize", "__call__"]] * 2
