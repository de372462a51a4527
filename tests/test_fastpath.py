"""The fast path's check at the start of a run, on the CPU with each failure injected: compilation that
raises, capture that raises, a compiled step whose loss differs. A failed default falls back with one
warning and trains exactly as the eager run; a failed path asked for by name is a one-line error; a
passing check leaves no trace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, assert_refused, run_entry
from torch import nn
from torch.utils import _pytree

from ddpm import cli, runtime
from ddpm.checkpoint import load_checkpoint
from ddpm.training import accel, capture, step
from ddpm.training.fastpath import FastPath, candidates

QUICK = TINY + ["steps=3", "sample_every=0", "checkpoint_every=0", "forward_n=0", "timesteps=20"]


class Scaled(nn.Module):
    """A "compiled" network whose output is off by a factor: a kernel that computes something else."""

    def __init__(self, net: nn.Module, factor: float) -> None:
        super().__init__()
        self.net, self.factor = net, factor

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.net(*args) * self.factor


class Broken(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("InductorError: no kernel for this op\nC++ compile error follows")


@pytest.fixture
def gpu_defaults(monkeypatch):
    """compile=null and cuda_graph=null resolve as on a GPU: on."""
    monkeypatch.setattr(runtime, "resolve_compile", lambda value, device: True if value is None else value)
    original = runtime.resolve_cuda_graph
    monkeypatch.setattr(
        runtime,
        "resolve_cuda_graph",
        lambda value, device, world: original(value, device, world) if value is not None else True,
    )


def fake_compile(monkeypatch, wrap) -> None:
    monkeypatch.setattr(accel.torch, "compile", lambda net, **kw: wrap(net))


def capture_raises(monkeypatch) -> None:
    def capture(self, batch):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(step.TrainStep, "capture", capture)


def train(tmp_path: Path, capsys, name: str, *args: str) -> tuple[int, list[str], str, Path]:
    run = tmp_path / name
    code, lines, out = run_entry(cli.train_main, [*QUICK, *args, f"hydra.run.dir={run}"], capsys)
    return code, lines, out, run


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_checkpoint(a / "checkpoints" / "last.pt"), load_checkpoint(b / "checkpoints" / "last.pt")
    return all(torch.equal(x[k][n], y[k][n]) for k in ("model", "ema") for n in x[k])


def paths_logged(run: Path) -> set[str]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {row["path"] for row in rows if "path" in row}


def test_candidates_fall_back_to_compiled_then_eager_and_keep_what_was_asked_for():
    both = FastPath(True, True)
    assert candidates(both, False, False) == [both, FastPath(True, False), FastPath(False, False)]
    assert candidates(both, True, False) == [both, FastPath(True, False)]  # compile=true: never eager
    assert candidates(both, False, True) == [both, FastPath(False, True)]  # cuda_graph=true: keeps the graph
    assert candidates(FastPath(False, True), False, False) == [FastPath(False, True), FastPath(False, False)]
    assert [p.name for p in candidates(both, False, False)] == ["compiled + CUDA graph", "compiled", "eager"]


@pytest.mark.parametrize(
    ("inject", "cause"),
    [
        ("compile_raises", "(RuntimeError: InductorError: no kernel for this op)"),
        ("loss_differs", "is not the eager step's"),
    ],
)
def test_a_failing_default_falls_back_and_trains_as_eager(
    tmp_path, capsys, monkeypatch, gpu_defaults, inject, cause
):
    code, _, _, eager = train(tmp_path, capsys, "eager", "compile=false", "cuda_graph=false")
    assert code == 0
    fake_compile(monkeypatch, Broken if inject == "compile_raises" else lambda net: Scaled(net, 1.5))
    capture_raises(monkeypatch)
    code, _, out, run = train(tmp_path, capsys, "fell_back")
    assert code == 0, out
    warnings = [line for line in out.splitlines() if line.startswith("warning: the ")]
    assert warnings == [
        "warning: the compiled + CUDA graph step failed its check (RuntimeError: CUDA error: operation not "
        "permitted when stream is capturing); training compiled",
        warnings[1],
    ]
    assert cause in warnings[1] and warnings[1].endswith("; training eager")
    assert "fp32, eager |" in out  # the header names the path that runs
    assert paths_logged(run) == {"eager"}
    assert same_weights(run, eager)  # the checks left no trace: the same steps as the plain eager run


def test_a_passing_check_leaves_no_trace(tmp_path, capsys, monkeypatch, gpu_defaults):
    """A "compilation" that computes what eager does passes; the run then trains exactly as eager would,
    with dropout on (the check compares with it off, and puts every RNG back)."""
    args = ("cuda_graph=false", "model.dropout=0.2")
    code, _, _, eager = train(tmp_path, capsys, "eager", "compile=false", *args)
    assert code == 0
    fake_compile(monkeypatch, lambda net: Scaled(net, 1.0))
    code, _, out, run = train(tmp_path, capsys, "compiled", *args)
    assert code == 0, out
    assert "warning" not in out and "fp32, compiled |" in out
    assert paths_logged(run) == {"compiled"}
    assert same_weights(run, eager)


@pytest.mark.parametrize(
    ("asked", "message"),
    [
        ("compile=true", "compile=true: the compiled step failed its check before the first step"),
        ("compile=true cuda_graph=true", "compile=true and cuda_graph=true: the compiled + CUDA graph step"),
    ],
)
def test_a_failing_path_asked_for_by_name_is_a_one_line_error(
    tmp_path, capsys, monkeypatch, gpu_defaults, asked, message
):
    fake_compile(monkeypatch, Broken)
    capture_raises(monkeypatch)
    monkeypatch.setattr(runtime, "resolve_cuda_graph", lambda value, device, world: bool(value))
    args = asked.split()
    code, lines, out, run = train(tmp_path, capsys, "asked", *args)
    assert_refused("ddpm-train", code, lines, out, args)
    assert code == 2 and message in lines[0], lines
    assert {p.name for p in run.iterdir()} <= {".hydra"}  # nothing but Hydra's record


class ReplayedOnCPU:
    """CapturedGraph without CUDA: the same rehearsals and static buffers, each call copying its inputs in
    (copy_into, which refuses inputs of another structure) and running the step on the buffers."""

    def __init__(self, fn, example, undo) -> None:
        self.fn, self.static = fn, _pytree.tree_map(lambda x: x.clone(), example)
        capture.rehearse(fn, self.static, undo)

    def __call__(self, inputs):
        capture.copy_into(self.static, inputs)
        return self.fn(self.static)


@pytest.mark.parametrize("kind", [(), ("class_cond=true", "learn_sigma=true")])
def test_the_checked_graph_takes_the_runs_batches(tmp_path, capsys, monkeypatch, gpu_defaults, kind):
    """The graph the check captured on its own inputs replays the run's batches: the digits carry labels,
    which an unconditional step drops, so both have one structure; the run trains as eager does."""
    code, _, _, eager = train(tmp_path, capsys, "eager", "compile=false", "cuda_graph=false", *kind)
    assert code == 0
    fake_compile(monkeypatch, lambda net: Scaled(net, 1.0))
    monkeypatch.setattr(step, "CapturedGraph", ReplayedOnCPU)
    code, _, out, run = train(tmp_path, capsys, "replayed", *kind)
    assert code == 0, out
    assert "warning" not in out and "compiled, CUDA graph |" in out
    assert paths_logged(run) == {"compiled + CUDA graph"}
    assert same_weights(run, eager)
