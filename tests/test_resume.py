"""Exact resume, kept checkpoints, signals, non-finite steps and disk faults, through train() itself."""

import json
import multiprocessing
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import TINY, Exploit, signal_at, write_bad_files, write_random

import ddpm.training.loop
import ddpm.training.setup
from ddpm.checkpoint import load_checkpoint
from ddpm.errors import CheckpointError, ConfigError
from ddpm.training.loop import train
from ddpm.training.step import TrainStep
from ddpm.training.stopping import TrainingStopped

# Everything that draws random numbers or keeps state across steps: dropout (torch RNG), flips and epoch
# boundaries (the data order: 1,797 digits make 5 batches of 300 an epoch), warm-up and cosine decay (LR
# schedule), EMA with warm-up, Adam's moments.
EXACT = TINY + [
    "batch_size=300",
    "timesteps=20",
    "steps=7",
    "model.dropout=0.1",
    "data.hflip=true",
    "lr_warmup=2",
    "lr_decay=cosine",
    "checkpoint_every=3",
    "sample_every=0",
    "forward_n=0",
]


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    for sa, sb in zip(
        a["state"]["optimizer"]["state"].values(), b["state"]["optimizer"]["state"].values(), strict=True
    ):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


# a class-conditional run also draws the label-drop mask at every step
CONDITIONAL = ["class_cond=true", "cond_drop_prob=0.3"]


@pytest.mark.parametrize(
    "extra", [[], CONDITIONAL, ["learn_sigma=true"]], ids=["unconditional", "conditional", "learned"]
)
def test_interrupted_and_resumed_run_ends_bit_identical(compose_cfg, tmp_path, monkeypatch, extra):
    train(compose_cfg("train", EXACT + extra), tmp_path / "whole")

    signal_at(monkeypatch, 5)
    with pytest.raises(TrainingStopped, match=r"stopped by SIGTERM at step 5 of 7.*resume=auto") as stop:
        train(compose_cfg("train", EXACT + extra), tmp_path / "cut")
    assert stop.value.exit_code == 128 + signal.SIGTERM and not stop.value.error
    assert load_checkpoint(tmp_path / "cut/checkpoints/last.pt")["step"] == 5
    monkeypatch.undo()
    summary = train(compose_cfg("train", EXACT + extra + ["resume=auto"]), tmp_path / "cut", ["resume=auto"])

    assert summary["resumed_from"].endswith("last.pt")
    whole, cut = (load_checkpoint(tmp_path / r / "checkpoints/last.pt") for r in ("whole", "cut"))
    assert_same_state(whole, cut)
    # the same rows, each step once; the interrupted run added a row where it stopped
    assert [r["step"] for r in rows(tmp_path / "cut")] == [1, 2, 3, 4, 5, 6, 7]
    losses = {r["step"]: r["loss"] for r in rows(tmp_path / "whole")}
    assert all(r["loss"] == losses[r["step"]] for r in rows(tmp_path / "cut"))


def test_resume_from_an_earlier_checkpoint_rewinds_the_metrics(compose_cfg, tmp_path):
    run = tmp_path / "run"
    train(compose_cfg("train", EXACT + ["keep_last=0"]), run)
    final = load_checkpoint(run / "checkpoints/last.pt")
    ckpt = str(run / "checkpoints/step_000003.pt")
    train(compose_cfg("train", EXACT + [f"resume={ckpt}"]), run, [f"resume={ckpt}"])
    assert_same_state(final, load_checkpoint(run / "checkpoints/last.pt"))
    assert [r["step"] for r in rows(run)] == [1, 2, 3, 4, 5, 6, 7]


def test_a_crash_after_going_back_leaves_the_run_at_the_earlier_checkpoint(
    compose_cfg, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    train(compose_cfg("train", EXACT + ["keep_last=0"]), run)

    def crash(*args, **kwargs):
        raise RuntimeError("the machine went away")

    monkeypatch.setattr(TrainStep, "optimize", crash)
    ckpt = str(run / "checkpoints/step_000003.pt")
    with pytest.raises(RuntimeError):
        train(compose_cfg("train", EXACT + [f"resume={ckpt}"]), run, [f"resume={ckpt}"])
    # resume=auto now continues from step 3, where the metrics were wound back to, not from step 7
    assert load_checkpoint(run / "checkpoints/last.pt")["step"] == 3
    assert [r["step"] for r in rows(run)] == [1, 2, 3]


def test_resume_into_a_new_directory_copies_the_history(compose_cfg, tmp_path):
    train(compose_cfg("train", EXACT + ["keep_last=0"]), tmp_path / "a")
    ckpt = str(tmp_path / "a/checkpoints/step_000006.pt")
    train(compose_cfg("train", EXACT + [f"resume={ckpt}"]), tmp_path / "b", [f"resume={ckpt}"])
    assert [r["step"] for r in rows(tmp_path / "b")] == [1, 2, 3, 4, 5, 6, 7]
    assert_same_state(*(load_checkpoint(tmp_path / r / "checkpoints/last.pt") for r in "ab"))


def test_resume_takes_the_saved_config_and_refuses_a_different_one(compose_cfg, tmp_path):
    run = tmp_path / "run"
    train(compose_cfg("train", EXACT + ["loss=l1", "steps=3"]), run)
    # Overrides not repeated: the saved loss=l1 holds. steps may grow.
    train(compose_cfg("train", EXACT + ["steps=4", "resume=auto"]), run, ["steps=4", "resume=auto"])
    saved = load_checkpoint(run / "checkpoints/last.pt")
    assert saved["step"] == 4 and saved["config"]["loss"] == "l1"
    # Repeating the original value is fine; asking for another is not.
    train(
        compose_cfg("train", EXACT + ["loss=l1", "steps=5", "resume=auto"]), run, ["loss=l1", "resume=auto"]
    )
    with pytest.raises(ConfigError, match=r"loss=huber differs from the resumed run's loss=l1"):
        train(compose_cfg("train", EXACT + ["loss=huber", "resume=auto"]), run, ["loss=huber", "resume=auto"])
    with pytest.raises(ConfigError, match=r"model.dim=16 differs"):
        train(compose_cfg("train", EXACT + ["model.dim=16", "resume=auto"]), run, ["model.dim=16"])


def test_resume_auto_starts_a_run_that_has_no_checkpoint_yet(compose_cfg, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "lo')  # killed mid-line
    train(compose_cfg("train", EXACT + ["steps=2", "resume=auto"]), run)
    assert "no checkpoint" in capsys.readouterr().out
    assert [r["step"] for r in rows(run)] == [1, 2] and rows(run)[0]["loss"] != 9.0


def test_a_finished_run_resumes_to_nothing(compose_cfg, tmp_path, capsys):
    train(compose_cfg("train", EXACT + ["steps=2"]), tmp_path)
    summary = train(compose_cfg("train", EXACT + ["steps=2", "resume=auto"]), tmp_path)
    assert summary["steps"] == 2 and "nothing to do" in capsys.readouterr().out


def test_a_new_run_never_overwrites_one(compose_cfg, tmp_path):
    train(compose_cfg("train", EXACT + ["steps=1"]), tmp_path)
    before = (tmp_path / "checkpoints/last.pt").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run: continue it with resume=auto"):
        train(compose_cfg("train", EXACT + ["steps=1"]), tmp_path)
    assert (tmp_path / "checkpoints/last.pt").read_bytes() == before


def test_resume_refuses_weights_only_and_changed_data(compose_cfg, tmp_path):
    from ddpm.checkpoint import save_checkpoint

    bare = tmp_path / "bare.pt"
    save_checkpoint(bare, step=1, model={}, config={})
    with pytest.raises(CheckpointError, match="holds weights only"):
        train(compose_cfg("train", EXACT + [f"resume={bare}"]), tmp_path / "x")
    with pytest.raises(ConfigError, match=r"resume=.*nope.pt does not exist"):
        train(compose_cfg("train", EXACT + [f"resume={tmp_path / 'nope.pt'}"]), tmp_path / "x")


def test_keep_last_keeps_the_newest_checkpoints(compose_cfg, tmp_path):
    train(
        compose_cfg("train", TINY + ["steps=5", "checkpoint_every=1", "keep_last=2", "sample_every=0"]),
        tmp_path,
    )
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["last.pt", "step_000004.pt", "step_000005.pt"]
    assert load_checkpoint(tmp_path / "checkpoints/last.pt")["step"] == 5


def test_sigint_stops_at_the_step_boundary_with_a_checkpoint(compose_cfg, tmp_path, monkeypatch):
    signal_at(monkeypatch, 2, signal.SIGINT)
    with pytest.raises(TrainingStopped, match="stopped by SIGINT at step 2") as stop:
        train(compose_cfg("train", EXACT), tmp_path)
    assert stop.value.exit_code == 130
    assert load_checkpoint(tmp_path / "checkpoints/last.pt")["step"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers handed back


def test_a_stop_and_the_resume_land_in_one_train_log(compose_cfg, tmp_path, monkeypatch):
    overrides = TINY + ["steps=3", "timesteps=20", "checkpoint_every=0", "sample_every=0", "forward_n=0"]
    signal_at(monkeypatch, 2, signal.SIGINT)
    with pytest.raises(TrainingStopped) as stop:
        train(compose_cfg("train", overrides), tmp_path)
    monkeypatch.undo()
    lines = [line[20:] for line in (tmp_path / "train.log").read_text().splitlines()]
    assert lines[-1] == stop.value.line("ddpm-train") and lines[-1].startswith(
        "ddpm-train: stopped by SIGINT"
    )
    train(compose_cfg("train", overrides + ["resume=auto"]), tmp_path, ["resume=auto"])
    lines = [line[20:] for line in (tmp_path / "train.log").read_text().splitlines()]
    assert sum(line.startswith("ddpm-train | data digits") for line in lines) == 2
    assert any(line.startswith("resuming from ") for line in lines)
    assert lines[-1].startswith("done: steps 3-3")
    # a complete run resumed again has nothing to do, and writes nothing
    before = sorted(p.name for p in tmp_path.rglob("*"))
    log = (tmp_path / "train.log").read_text()
    train(compose_cfg("train", overrides + ["resume=auto"]), tmp_path, ["resume=auto"])
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "train.log").read_text() == log


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(compose_cfg, tmp_path):
    # A learning rate this large overflows the weights within a few steps: a real NaN, not an injected one.
    overrides = EXACT + [
        "lr=1e30",
        "lr_warmup=0",
        "lr_decay=none",
        "steps=40",
        "checkpoint_every=1",
        "log_every=20",
        "keep_last=0",
    ]
    with pytest.raises(TrainingStopped, match=r"non-finite loss or gradient at step (\d+)") as stop:
        train(compose_cfg("train", overrides), tmp_path)
    bad = int(stop.value.args[0].split("at step ")[1].split(";")[0])
    last = load_checkpoint(tmp_path / "checkpoints/last.pt")
    assert last["step"] == bad - 1 and "last good checkpoint" in str(stop.value)
    for ckpt in (tmp_path / "checkpoints").iterdir():
        weights = load_checkpoint(ckpt)["model"]
        assert all(torch.isfinite(w).all() for w in weights.values()), ckpt.name


def test_nonfinite_steps_are_skipped_when_asked(compose_cfg, tmp_path, monkeypatch):
    real = ddpm.training.setup.build_dataset

    def with_a_nan_image(data, labels=False):
        dataset = real(data, labels)
        dataset.images = dataset.images.float()
        dataset.images[7] = float("nan")  # one image in 1,797: the batches holding it go non-finite
        return dataset

    monkeypatch.setattr(ddpm.training.setup, "build_dataset", with_a_nan_image)
    overrides = TINY + ["batch_size=600", "steps=6", "on_nonfinite=skip", "sample_every=0", "timesteps=20"]
    summary = train(compose_cfg("train", overrides), tmp_path)
    assert 1 <= summary["skipped"] <= 3  # one of the three batches of each epoch holds image 7
    weights = load_checkpoint(tmp_path / "checkpoints/last.pt")["model"]
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert rows(tmp_path)[-1]["skipped"] == summary["skipped"]
    assert all(r["loss"] == r["loss"] for r in rows(tmp_path))  # no NaN in the log


def test_skip_gives_up_after_max_nonfinite_in_a_row(compose_cfg, tmp_path):
    overrides = TINY + ["lr=1e30", "steps=60", "on_nonfinite=skip", "max_nonfinite=3", "sample_every=0"]
    with pytest.raises(TrainingStopped, match=r"3 steps in a row up to step \d+ had a non-finite"):
        train(compose_cfg("train", overrides), tmp_path)


def test_a_checkpoint_that_cannot_be_written_stops_the_run(compose_cfg, tmp_path, monkeypatch):
    # The write of step 4's checkpoint goes to /dev/full: the kernel's own "No space left on device".
    real, calls = TrainStep.optimize, []

    def fill_the_disk_before_step_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            os.symlink("/dev/full", tmp_path / "checkpoints/.step_000004.pt.tmp")
        return real(*args, **kwargs)

    monkeypatch.setattr(TrainStep, "optimize", fill_the_disk_before_step_4)
    overrides = TINY + ["steps=6", "checkpoint_every=2", "sample_every=0"]
    with pytest.raises(
        TrainingStopped,
        match=r"step_000004.pt: No space left on device; the last good "
        r"checkpoint, .*step_000002.pt, is kept; stopped rather than train on",
    ):
        train(compose_cfg("train", overrides), tmp_path)
    assert load_checkpoint(tmp_path / "checkpoints/last.pt")["step"] == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.pt", "step_000002.pt"]


def test_a_folder_with_fewer_readable_images_than_a_batch_is_refused(compose_cfg, tmp_path):
    (tmp_path / "pics").mkdir()
    write_bad_files(tmp_path / "pics")
    for i in range(3):
        write_random(tmp_path / "pics" / f"ok{i}.png", seed=i)
    overrides = TINY + ["data=folder", f"data.root={tmp_path / 'pics'}", "data.image_size=8", "batch_size=4"]
    with pytest.raises(ConfigError, match=r"batch_size=4 is larger than the data set \(3 images, besides 4 "):
        train(compose_cfg("train", overrides), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_resume_is_exact_with_loader_workers_and_flips(compose_cfg, tmp_path, monkeypatch):
    # Two worker processes load the images; the flips and the order come from the data order alone.
    (tmp_path / "pics").mkdir()
    for i in range(40):
        write_random(tmp_path / "pics" / f"{i:02d}.png", shape=(12, 10, 3), seed=i)
    overrides = TINY + [
        "data=folder",
        f"data.root={tmp_path / 'pics'}",
        "data.image_size=8",
        "data.num_workers=2",
        "data.on_device=false",  # the DataLoader's path, which auto would not take for so small a set
        "data.hflip=true",
        "steps=6",
        "checkpoint_every=2",
        "sample_every=0",
        "forward_n=0",
        "timesteps=20",
    ]  # 40 images: 2 batches of 16 an epoch, so the run crosses two epoch boundaries
    train(compose_cfg("train", overrides), tmp_path / "whole")
    assert not multiprocessing.active_children()  # the loader's workers end with the run
    signal_at(monkeypatch, 3)
    with pytest.raises(TrainingStopped):
        train(compose_cfg("train", overrides), tmp_path / "cut")
    assert not multiprocessing.active_children()  # and with a stopped one
    monkeypatch.undo()
    train(compose_cfg("train", overrides + ["resume=auto"]), tmp_path / "cut")
    assert_same_state(*(load_checkpoint(tmp_path / r / "checkpoints/last.pt") for r in ("whole", "cut")))


def test_files_a_crash_left_half_written_are_cleared_on_resume(compose_cfg, tmp_path):
    overrides = TINY + ["checkpoint_every=1", "sample_every=0"]
    train(compose_cfg("train", overrides + ["steps=2"]), tmp_path)
    # what a kill during the writes of step 3 leaves: the temporary files, never a half checkpoint
    (tmp_path / "checkpoints/.step_000003.pt.tmp").write_bytes(b"PK\x03\x04 half a zip")
    (tmp_path / "checkpoints/.last.pt.tmp").write_bytes(b"")
    (tmp_path / "samples/.step_000003.png.tmp").write_bytes(b"\x89PNG")
    assert load_checkpoint(tmp_path / "checkpoints/last.pt")["step"] == 2
    train(compose_cfg("train", overrides + ["steps=3", "resume=auto"]), tmp_path, ["steps=3", "resume=auto"])
    assert not list(tmp_path.rglob(".*.tmp"))
    assert load_checkpoint(tmp_path / "checkpoints/last.pt")["step"] == 3


def test_a_crafted_checkpoint_is_refused_as_a_resume_point(compose_cfg, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "run/checkpoints/last.pt"
    evil.parent.mkdir(parents=True)
    torch.save({"format": "ddpm-checkpoint", "version": 2, "state": Exploit(str(marker))}, evil)
    with pytest.raises(
        CheckpointError, match=r"resume=.*last.pt was refused: loading it would call posix.system"
    ):
        train(compose_cfg("train", EXACT + ["resume=auto"]), tmp_path / "run")
    assert not marker.exists()
    cut = tmp_path / "cut.pt"
    train(compose_cfg("train", EXACT + ["steps=1"]), tmp_path / "ok")
    cut.write_bytes((tmp_path / "ok/checkpoints/last.pt").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"resume=.*cut.pt is not a readable checkpoint \(truncated"):
        train(compose_cfg("train", EXACT + [f"resume={cut}"]), tmp_path / "other")
