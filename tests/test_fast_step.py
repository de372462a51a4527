"""The fast step computes what the plain step computes: the masked skip of a non-finite step, the
learning rate and EMA weight in device tensors, the rehearsal before a CUDA-graph capture, bf16 autocast
and torch.compile; and a step never reads a tensor back on the host."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY, compose

from ddpm.diffusion.forward import Loss, Objective
from ddpm.diffusion.schedules import Schedule, linear_betas
from ddpm.errors import ConfigError
from ddpm.models.unet import UNet
from ddpm.progress import ProgressReporter
from ddpm.runtime import Precision, Runtime, resolve_compile, resolve_cuda_graph, resolve_precision
from ddpm.training.accel import Autocast, Snapshot, prepare_net, rehearse, step_tensors, training_step
from ddpm.training.ema import EMA
from ddpm.training.interval import Interval
from ddpm.training.step import StepOptions, build_optimizer, lr_factor, settle_loaded, step_draws, train_step
from ddpm.training.stopping import NonFiniteWatch

CPU = torch.device("cpu")
SHAPE = (8, 1, 8, 8)
T = 20


def opts(skip: bool = True, clip: float = 1.0) -> StepOptions:
    return StepOptions(Loss.huber, Objective.eps, 0.0, 0.0, 1, clip, skip)


def tiny() -> tuple[UNet, Schedule]:
    torch.manual_seed(0)
    model = UNet(1, 8, (1, 2), resnet_block_groups=2, attn_heads=2, attn_dim_head=8)
    return model, Schedule.from_betas(linear_betas(T, 1e-4, 0.02))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x0 = torch.rand(SHAPE, generator=torch.Generator().manual_seed(step)) * 2 - 1
    return (x0, *step_draws(0, step, SHAPE, T, 0.0, CPU))


def weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_a_masked_skip_leaves_what_a_skipped_step_leaves():
    """Fused Adam with found_inf set changes nothing, so the run goes on as one that never took the step."""
    bad_steps = {3, 4}
    runs = []
    for masked in (True, False):
        model, schedule = tiny()
        optimizer = build_optimizer(model, 1e-3, CPU)
        for step in range(1, 8):
            x0, t, noise = batch(step)
            if step in bad_steps:
                x0 = x0.clone()
                x0[0, 0, 0, 0] = float("nan")
                if not masked:
                    continue  # the plain skip: no step at all
            result = train_step(model, optimizer, schedule, x0, t, noise, opts())
            assert bool(result.finite) == (step not in bad_steps)
        runs.append((weights(model), [float(s["step"]) for s in optimizer.state.values()]))
    (masked_w, masked_steps), (plain_w, plain_steps) = runs
    assert masked_steps == plain_steps == [5.0] * len(masked_steps)  # Adam's count skips the bad steps too
    for a, b in zip(masked_w, plain_w, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_without_skip_a_non_finite_step_is_taken():
    """on_nonfinite=stop: the step goes through (the run stops at the next check, keeping its last
    checkpoint); found_inf is never set."""
    model, schedule = tiny()
    optimizer = build_optimizer(model, 1e-3, CPU)
    x0, t, noise = batch(1)
    x0[0, 0, 0, 0] = float("nan")
    result = train_step(model, optimizer, schedule, x0, t, noise, opts(skip=False))
    assert not bool(result.finite) and not hasattr(optimizer, "found_inf")
    assert not all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_the_lr_schedule_writes_the_device_lr_in_place():
    model, _ = tiny()
    optimizer = build_optimizer(model, 1e-3, CPU)
    lr = optimizer.param_groups[0]["lr"]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, 4, "none", 10))
    for step in range(6):
        assert optimizer.param_groups[0]["lr"] is lr  # the tensor a captured step reads
        assert float(lr) == pytest.approx(1e-3 * min(1.0, (step + 1) / 4))
        schedule.step()
    # a checkpoint of an earlier version holds the lr as a float: it goes back into a tensor
    optimizer.load_state_dict(
        {**optimizer.state_dict(), "param_groups": [{**optimizer.param_groups[0], "lr": 5e-4}]}
    )
    settle_loaded(optimizer, CPU)
    assert isinstance(optimizer.param_groups[0]["lr"], torch.Tensor)
    assert float(optimizer.param_groups[0]["lr"]) == pytest.approx(5e-4)


def test_the_ema_weight_in_a_device_tensor_gives_the_host_decay():
    model, _ = tiny()
    ema = EMA(model, decay=0.999, warmup=10)
    ema.at(5)
    assert float(ema.weight) == pytest.approx(1 - 6 / 15)  # decay min(0.999, (1 + 5) / (10 + 5))
    before = weights(ema.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.apply()
    for old, new, live in zip(before, ema.model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(new, old + 0.6 * (live - old))


def run_steps(model, schedule, optimizer, ema, steps) -> list[float]:
    losses = []
    for step in steps:
        ema.at(step)
        result = train_step(model, optimizer, schedule, *batch(step), opts())
        ema.apply()
        losses.append(float(result.loss))
    return losses


@pytest.mark.parametrize("resumed", [False, True])
def test_a_rehearsal_before_capture_leaves_no_trace(resumed):
    """The steps run to warm up before a CUDA graph is captured are undone in place: what follows is the
    run without them, bit for bit, from a fresh optimizer or from one with state."""
    runs = []
    for rehearsed in (False, True):
        model, schedule = tiny()
        optimizer = build_optimizer(model, 1e-3, CPU)
        ema = EMA(model, 0.99, 0)
        first = run_steps(model, schedule, optimizer, ema, [1, 2]) if resumed else []
        if rehearsed:
            snapshot = Snapshot.take(step_tensors(model, ema, optimizer), optimizer)

            def step(x0, t, noise, model=model, optimizer=optimizer, ema=ema, schedule=schedule):
                train_step(model, optimizer, schedule, x0, t, noise, opts())
                ema.apply()

            rehearse(step, batch(99), snapshot)
        runs.append((first + run_steps(model, schedule, optimizer, ema, [3, 4, 5]), weights(ema.model)))
    (plain_loss, plain_ema), (rehearsed_loss, rehearsed_ema) = runs
    assert rehearsed_loss == plain_loss
    for a, b in zip(plain_ema, rehearsed_ema, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class HostReadError(AssertionError):
    pass


def test_a_step_never_reads_a_tensor_back(monkeypatch):
    """The step, the EMA update, the non-finite watch and the interval's sums stay on the device: any read
    of a tensor's value on the host (bool, int, float, item, tolist) would wait for a GPU."""
    model, schedule = tiny()
    optimizer = build_optimizer(model, 1e-3, CPU)
    ema = EMA(model, 0.999, 10)
    interval, watch = Interval(CPU), NonFiniteWatch(True, 10, CPU)
    for step in (1, 2):  # the first step creates Adam's state
        x0, t, noise = batch(step)

        def forbid(*args, **kwargs):
            raise HostReadError("a tensor was read on the host inside the step")

        if step == 2:
            for name in ("__bool__", "__int__", "__float__", "item", "tolist"):
                monkeypatch.setattr(torch.Tensor, name, forbid)
        ema.at(step)
        result = train_step(model, optimizer, schedule, x0, t, noise, opts())
        ema.apply()
        watch.record(step, result.finite)
        interval.add(result)
    monkeypatch.undo()
    assert interval.steps == 2 and watch.skipped == 0


def test_bf16_autocast_runs_the_unet_in_bf16_and_keeps_everything_else_fp32():
    model, schedule = tiny()
    net = Autocast(model, torch.bfloat16)
    x0, t, noise = batch(1)
    seen = []
    model.init_conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    out = net(x0, t)
    assert seen == [torch.bfloat16] and out.dtype == torch.float32
    optimizer = build_optimizer(model, 1e-3, CPU)
    result = train_step(net, optimizer, schedule, x0, t, noise, opts())
    assert result.loss.dtype == torch.float32
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())


def test_bf16_training_follows_fp32_closely():
    """bf16 keeps 8 bits of mantissa: a loss drifts by a few parts in a thousand per step, far less than
    the loss moves from batch to batch."""
    losses = []
    for dtype in (torch.float32, torch.bfloat16):
        model, schedule = tiny()
        net = prepare_net(model, Runtime(CPU, precision=dtype))
        optimizer = build_optimizer(model, 1e-3, CPU)
        losses.append(
            [float(train_step(net, optimizer, schedule, *batch(s), opts()).loss) for s in range(1, 11)]
        )
    fp32, bf16 = losses
    assert bf16 != fp32
    assert bf16 == pytest.approx(fp32, rel=0.05)


@pytest.mark.slow
def test_compiled_losses_equal_eager_ones_over_100_steps():
    """torch.compile (Inductor's C++ code on the CPU) fuses and reorders float32 sums: each loss moves by
    rounding only, compounding through Adam over the steps, while a different batch moves it by several
    percent. (A one-level U-Net: a cold compile costs seconds per kernel on two cores.)"""
    losses = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = UNet(1, 8, (1,), resnet_block_groups=2, attn_heads=1, attn_dim_head=8)
        schedule = Schedule.from_betas(linear_betas(T, 1e-4, 0.02))
        net = prepare_net(model, Runtime(CPU, compile=compiled))
        optimizer = build_optimizer(model, 1e-3, CPU)
        losses.append(
            [float(train_step(net, optimizer, schedule, *batch(s), opts()).loss) for s in range(1, 101)]
        )
    eager, compiled = losses
    assert compiled[:10] == pytest.approx(eager[:10], rel=1e-4)
    assert compiled == pytest.approx(eager, rel=2e-2)


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_takes_bf16_where_the_cpu_computes_it(monkeypatch, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    assert resolve_precision(Precision.auto, CPU) == (torch.bfloat16 if native else torch.float32)
    assert resolve_precision(Precision.fp32, CPU) == torch.float32
    assert resolve_precision(Precision.bf16, CPU) == torch.bfloat16  # emulated, slower, but allowed


def test_the_choices_follow_the_device():
    assert not resolve_compile(None, CPU) and resolve_compile(True, CPU)
    assert not resolve_cuda_graph(None, CPU, 1)
    gpu = torch.device("cuda")
    assert resolve_compile(None, gpu) and resolve_cuda_graph(None, gpu, 1)
    assert not resolve_cuda_graph(None, gpu, 2)


def test_a_gpu_without_bf16_refuses_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    with pytest.raises(ConfigError, match="precision=bf16 is invalid on Tesla V100: choose fp32"):
        resolve_precision(Precision.bf16, torch.device("cuda"))
    assert resolve_precision(Precision.auto, torch.device("cuda")) == torch.float32


@pytest.mark.parametrize(
    ("value", "world", "message"),
    [(True, 1, "cuda_graph=true needs a CUDA device, not cpu"), (True, 2, None)],
)
def test_cuda_graph_refusals(value, world, message):
    if message is not None:
        with pytest.raises(ConfigError, match=message):
            resolve_cuda_graph(value, CPU, world)
    with pytest.raises(ConfigError, match="cuda_graph=true is invalid under torchrun"):
        resolve_cuda_graph(True, torch.device("cuda"), 2)


def test_peak_memory_is_reported_on_a_gpu_only(monkeypatch, capsys):
    assert Runtime(CPU).peak_memory_gb() is None
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**29)
    assert Runtime(torch.device("cuda")).peak_memory_gb() == 1.5
    reporter = ProgressReporter(10)
    reporter.log(5, 0.1, 100.0, 3.0, peak_gb=1.5)
    assert "100 img/s | peak 1.50 GB" in capsys.readouterr().out


def test_the_header_says_what_was_chosen(tmp_path, cli):
    result = cli(
        "ddpm-train", *TINY, "steps=2", "precision=bf16", "forward_n=0", "hydra.run.dir=run", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "device cpu, bf16, eager" in result.stdout
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "peak_mem_gb" not in rows[-1]


def test_the_config_keys_compose():
    cfg = compose("train", ["precision=bf16", "compile=false", "cuda_graph=null", "check_every=5"])
    assert (
        cfg.precision.value == "bf16"
        and cfg.compile is False
        and cfg.cuda_graph is None
        and cfg.check_every == 5
    )


# ---------------------------------------------------------------------------------------- on a CUDA GPU
# These run where a GPU is (scripts/gpu_check.sh runs this file first); here they are skipped.
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def graphed_or_eager(graphed: bool, compiled: bool, bad_step: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    device = torch.device("cuda")
    model, schedule = tiny()
    model, schedule = model.to(device), schedule.to(device)
    runtime = Runtime(device, compile=compiled, cuda_graph=graphed)
    net = prepare_net(model, runtime)
    optimizer = build_optimizer(model, 1e-3, device, capturable=graphed)
    ema = EMA(model, 0.99, 0)
    launch = training_step(model, net, optimizer, schedule, ema, opts(), runtime, SHAPE)
    losses = []
    for s in range(1, 31):
        x0, t, noise = (v.to(device) for v in batch(s))
        if s == bad_step:
            x0[0, 0, 0, 0] = float("nan")  # skipped by the masked update, inside the graph too
        ema.at(s)
        losses.append(launch(x0, t, noise).loss.clone())
    return torch.stack(losses), weights(ema.model)


@cuda
@pytest.mark.parametrize("compiled", [False, True])
def test_a_captured_step_computes_what_the_eager_step_computes(compiled):
    """Replaying the captured step launches the kernels the eager step launched, on the same numbers."""
    eager_loss, eager_ema = graphed_or_eager(False, compiled, bad_step=7)
    graph_loss, graph_ema = graphed_or_eager(True, compiled, bad_step=7)
    assert torch.isnan(graph_loss[6]) and torch.isfinite(graph_loss[7:]).all()
    torch.testing.assert_close(graph_loss, eager_loss, rtol=1e-4, atol=0, equal_nan=True)
    for a, b in zip(graph_ema, eager_ema, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


@cuda
def test_ddpm_train_picks_the_fast_path_on_a_gpu_and_it_matches_the_eager_losses(tmp_path, cli):
    args = [a for a in TINY if a != "device=cpu"] + ["device=cuda", "steps=20", "forward_n=0"]
    fast = cli("ddpm-train", *args, "hydra.run.dir=fast", cwd=tmp_path)
    assert fast.returncode == 0, fast.stderr
    bf16 = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    assert f"device cuda, {bf16}, compiled, CUDA graph" in fast.stdout
    rows = [json.loads(r) for r in (tmp_path / "fast" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["peak_mem_gb"] > 0 and "peak" in fast.stdout
    runs = {}
    for name, graph in (("graphed", "true"), ("eager", "false")):
        done = cli(
            "ddpm-train",
            *args,
            "precision=fp32",
            "compile=false",
            f"cuda_graph={graph}",
            f"hydra.run.dir={name}",
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        runs[name] = [
            json.loads(r)["loss"] for r in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        ]
    assert runs["graphed"] == pytest.approx(runs["eager"], rel=1e-4)
