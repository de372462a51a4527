"""The fast step computes what the plain step computes: the masked skip of a non-finite step, the
learning rate and EMA weight in device tensors, the rehearsal before a CUDA-graph capture, bf16 autocast
and torch.compile; and a step never reads a tensor back on the host."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY, compose

from ddpm.data.batch import Batch
from ddpm.diffusion.gaussian import Diffusion, Loss
from ddpm.diffusion.schedules import Schedule, linear_betas
from ddpm.errors import ConfigError
from ddpm.models.unet import UNet
from ddpm.progress import ProgressReporter
from ddpm.runtime import Precision, Runtime, resolve_compile, resolve_cuda_graph, resolve_precision
from ddpm.training.accel import Autocast, prepare_net
from ddpm.training.cadence import MetricsSinceLog
from ddpm.training.capture import RehearsalUndo, copy_into, rehearse
from ddpm.training.ema import EMA
from ddpm.training.step import (
    LRDecay,
    StepInputs,
    StepOptions,
    TrainStep,
    build_optimizer,
    lr_factor,
    lr_to_device,
    step_tensors,
)
from ddpm.training.stopping import NonFiniteWatch

CPU = torch.device("cpu")
SHAPE = (8, 1, 8, 8)
T = 20


def opts(skip: bool = True, clip: float = 1.0, warmup: int = 0, decay: LRDecay = LRDecay.none) -> StepOptions:
    return StepOptions(0, SHAPE[0], 1e-3, warmup, decay, 10, 1, clip, skip)


def tiny() -> tuple[UNet, Schedule]:
    torch.manual_seed(0)
    model = UNet(1, 8, (1, 2), resnet_block_groups=2, attn_heads=2, attn_dim_head=8)
    return model, Schedule.from_betas(linear_betas(T, 1e-4, 0.02))


def make_step(
    model: torch.nn.Module,
    schedule: Schedule,
    ema: EMA | None = None,
    options: StepOptions | None = None,
    net: torch.nn.Module | None = None,
    runtime: Runtime | None = None,
) -> TrainStep:
    runtime = runtime or Runtime(CPU)
    optimizer = build_optimizer(model, 1e-3, runtime.device, capturable=runtime.cuda_graph)
    diffusion = Diffusion(schedule, loss=Loss.huber).to(runtime.device)
    return TrainStep(
        model, net if net is not None else model, optimizer, diffusion, ema, options or opts(), runtime
    )


def batch(step: int) -> Batch:
    return Batch(torch.rand(SHAPE, generator=torch.Generator().manual_seed(step)) * 2 - 1)


def weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def poisoned(step: int) -> Batch:
    x0 = batch(step).images
    x0[0, 0, 0, 0] = float("nan")
    return Batch(x0)


def test_a_masked_skip_leaves_what_a_skipped_step_leaves():
    """Fused Adam with found_inf set changes nothing, so the run goes on as one that never took the step."""
    bad_steps = {3, 4}
    runs = []
    for masked in (True, False):
        model, schedule = tiny()
        train_step = make_step(model, schedule)
        for step in range(1, 8):
            if step in bad_steps and not masked:
                continue  # the plain skip: no step at all
            metrics = train_step(step, poisoned(step) if step in bad_steps else batch(step))
            assert bool(metrics["finite"]) == (step not in bad_steps)
        runs.append((weights(model), [float(s["step"]) for s in train_step.optimizer.state.values()]))
    (masked_w, masked_steps), (plain_w, plain_steps) = runs
    assert masked_steps == plain_steps == [5.0] * len(masked_steps)  # Adam's count skips the bad steps too
    for a, b in zip(masked_w, plain_w, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_without_skip_a_non_finite_step_is_taken():
    """on_nonfinite=stop: the step goes through (the run stops at the next check, keeping its last
    checkpoint); found_inf is never set."""
    model, schedule = tiny()
    train_step = make_step(model, schedule, options=opts(skip=False))
    metrics = train_step(1, poisoned(1))
    assert not bool(metrics["finite"]) and not hasattr(train_step.optimizer, "found_inf")
    assert not all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("decay", list(LRDecay))
def test_each_step_writes_the_lr_lambdalr_would_have_in_place(decay):
    """The step's lr is LambdaLR's to the bit (it was the run's schedule before the step owned it), written
    into the tensor a captured step reads."""
    model, schedule = tiny()
    train_step = make_step(model, schedule, options=opts(warmup=3, decay=decay))
    lr = train_step.optimizer.param_groups[0]["lr"]
    twin = build_optimizer(tiny()[0], 1e-3, CPU)
    reference = torch.optim.lr_scheduler.LambdaLR(twin, lambda s: lr_factor(s, 3, decay, 10))
    for step in range(1, 11):
        train_step.set_step(step)
        assert train_step.optimizer.param_groups[0]["lr"] is lr
        assert torch.equal(lr, twin.param_groups[0]["lr"]), step
        twin.step()
        reference.step()
    assert float(lr) == pytest.approx(1e-3 * lr_factor(9, 3, decay, 10))


def test_a_float_lr_from_an_earlier_checkpoint_goes_back_into_a_tensor():
    model, _ = tiny()
    optimizer = build_optimizer(model, 1e-3, CPU)
    optimizer.load_state_dict(
        {**optimizer.state_dict(), "param_groups": [{**optimizer.param_groups[0], "lr": 5e-4}]}
    )
    lr_to_device(optimizer, CPU)
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


def test_the_step_updates_the_ema_with_its_own_steps_weight():
    model, schedule = tiny()
    ema = EMA(model, decay=0.9, warmup=10)
    train_step = make_step(model, schedule, ema)
    before = weights(ema.model)
    train_step(4, batch(4))
    w = 1 - min(0.9, 5 / 14)
    for old, new, live in zip(before, ema.model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(new, old + w * (live - old))


def run_steps(train_step: TrainStep, steps) -> list[float]:
    return [float(train_step(step, batch(step))["loss"]) for step in steps]


@pytest.mark.parametrize("resumed", [False, True])
def test_a_rehearsal_before_capture_leaves_no_trace(resumed):
    """The steps run to warm up before a CUDA graph is captured are undone in place: what follows is the
    run without them, bit for bit, from a fresh optimizer or from one with state."""
    runs = []
    for rehearsed in (False, True):
        model, schedule = tiny()
        ema = EMA(model, 0.99, 0)
        train_step = make_step(model, schedule, ema)
        first = run_steps(train_step, [1, 2]) if resumed else []
        if rehearsed:
            undo = RehearsalUndo.take(step_tensors(model, ema, train_step.optimizer), train_step.optimizer)
            rehearse(train_step.optimize, train_step.draws(99, batch(99)), undo)
        runs.append((first + run_steps(train_step, [3, 4, 5]), weights(ema.model)))
    (plain_loss, plain_ema), (rehearsed_loss, rehearsed_ema) = runs
    assert rehearsed_loss == plain_loss
    for a, b in zip(plain_ema, rehearsed_ema, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_captured_steps_inputs_land_in_its_static_buffers_labels_too():
    static = StepInputs(
        Batch(torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long)), torch.zeros(2), torch.zeros(2)
    )
    images = static.batch.images
    step_inputs = StepInputs(
        Batch(torch.ones(2, 1, 2, 2), torch.tensor([3, 4])), torch.ones(2), torch.full((2,), 2.0)
    )
    copy_into(static, step_inputs)
    assert static.batch.images is images and images.eq(1).all()  # the very buffers the graph reads
    assert static.batch.labels.tolist() == [3, 4] and static.noise.tolist() == [2.0, 2.0]
    with pytest.raises(ValueError, match="differs from the captured one"):
        copy_into(static, StepInputs(Batch(torch.ones(2, 1, 2, 2)), torch.ones(2), torch.ones(2)))


def test_labels_reach_the_network_of_each_micro_batch():
    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.seen = []

        def forward(self, x, t, labels=None):
            self.seen.append(labels.tolist())
            return x * self.w

    model, (_, schedule) = Recorder(), tiny()
    options = StepOptions(0, SHAPE[0], 1e-3, 0, LRDecay.none, 10, 2, 0.0, False, num_classes=8)
    make_step(model, schedule, options=options)(1, Batch(batch(1).images, torch.arange(8)))
    assert model.seen == [[0, 1, 2, 3], [4, 5, 6, 7]]


class HostReadError(AssertionError):
    pass


def test_a_step_never_reads_a_tensor_back(monkeypatch):
    """The step, the EMA update, the non-finite watch and the interval's sums stay on the device: any read
    of a tensor's value on the host (bool, int, float, item, tolist) would wait for a GPU."""
    model, schedule = tiny()
    ema = EMA(model, 0.999, 10)
    train_step = make_step(model, schedule, ema)
    since_log, watch = MetricsSinceLog(CPU), NonFiniteWatch(True, 10, CPU)
    for step in (1, 2):  # the first step creates Adam's state
        x = batch(step)

        def forbid(*args, **kwargs):
            raise HostReadError("a tensor was read on the host inside the step")

        if step == 2:
            for name in ("__bool__", "__int__", "__float__", "item", "tolist"):
                monkeypatch.setattr(torch.Tensor, name, forbid)
        metrics = train_step(step, x)
        watch.record(step, metrics["finite"])
        since_log.add(metrics)
    monkeypatch.undo()
    assert since_log.steps == 2 and watch.skipped == 0


def test_bf16_autocast_runs_the_unet_in_bf16_and_keeps_everything_else_fp32():
    model, schedule = tiny()
    net = Autocast(model, torch.bfloat16)
    x0, t = batch(1).images, torch.zeros(SHAPE[0], dtype=torch.long)
    seen = []
    model.init_conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    out = net(x0, t)
    assert seen == [torch.bfloat16] and out.dtype == torch.float32
    metrics = make_step(model, schedule, net=net)(1, batch(1))
    assert metrics["loss"].dtype == torch.float32
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())


def test_bf16_training_follows_fp32_closely():
    """bf16 keeps 8 bits of mantissa: a loss drifts by a few parts in a thousand per step, far less than
    the loss moves from batch to batch."""
    losses = []
    for dtype in (torch.float32, torch.bfloat16):
        model, schedule = tiny()
        net = prepare_net(model, Runtime(CPU, precision=dtype))
        losses.append(run_steps(make_step(model, schedule, net=net), range(1, 11)))
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
        losses.append(run_steps(make_step(model, schedule, net=net), range(1, 101)))
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
    model = model.to(device)
    runtime = Runtime(device, compile=compiled, cuda_graph=graphed)
    ema = EMA(model, 0.99, 0)
    train_step = make_step(model, schedule, ema, net=prepare_net(model, runtime), runtime=runtime)
    losses = []
    for s in range(1, 31):
        # skipped by the masked update, inside the graph too
        x = (poisoned(s) if s == bad_step else batch(s)).to(device)
        losses.append(train_step(s, x)["loss"].clone())
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
@pytest.mark.parametrize(
    "extra",
    [[], ["class_cond=true"], ["learn_sigma=true"]],
    ids=["unconditional", "conditional", "learned"],
)
def test_ddpm_train_picks_the_fast_path_on_a_gpu_and_it_matches_the_eager_losses(tmp_path, cli, extra):
    # conditional: the labels, with the dropped ones replaced before the graph, ride in its static buffers;
    # learned: the 2C-channel output and the hybrid loss's L_vlb term inside the graph
    args = [a for a in TINY if a != "device=cpu"] + ["device=cuda", "steps=20", "forward_n=0", *extra]
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
