"""The numbers a seed gives stay the same when code moves: a short run's losses and final grid, and the
samples of a checkpoint written by an earlier version (fixtures/, recorded by fixtures/record_pins.py).

Tolerances follow from what differs between CPUs: the order of float32 sums inside convolutions (relative
1e-6 per operation), which Adam can turn into a full lr-sized step for a weight whose gradient is near
zero. Over 4 steps of a tiny U-Net that moves a loss by far less than 1e-3 of itself, while a different
noise draw, timestep or data order moves it by a few percent (a batch of 16 8x8 images); grid pixels may
round one or two grey levels the other way where an unrelated change redraws them entirely."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import FIXTURES, PIN_RUN, compose, pinned_samples, train_for_pin
from PIL import Image

PINS = json.loads((FIXTURES / "pinned.json").read_text())


def test_a_short_run_gives_the_pinned_losses_and_grid(tmp_path):
    assert PINS["run"] == PIN_RUN, "the pinned run changed: re-record with fixtures/record_pins.py"
    losses = train_for_pin(compose("train", PIN_RUN), tmp_path)
    assert losses == pytest.approx(PINS["losses"], rel=1e-3)
    grid = np.asarray(Image.open(tmp_path / "samples" / "step_000004.png"), dtype=np.int16)
    pinned = np.asarray(Image.open(FIXTURES / "pinned_grid.png"), dtype=np.int16)
    assert grid.shape == pinned.shape
    diff = np.abs(grid - pinned)
    assert diff.max() <= 3 and diff.mean() < 0.5


def test_a_checkpoint_of_an_earlier_version_samples_the_pinned_images():
    samples = pinned_samples(FIXTURES / "tiny_v2.pt")
    pinned = torch.tensor(PINS["samples"]).reshape(samples.shape)
    torch.testing.assert_close(samples, pinned, rtol=0, atol=1e-3)


def test_an_export_of_an_earlier_version_samples_the_same_images():
    torch.testing.assert_close(
        pinned_samples(FIXTURES / "tiny_v2.safetensors"), pinned_samples(FIXTURES / "tiny_v2.pt")
    )


def test_a_checkpoint_of_an_earlier_version_resumes(tmp_path):
    run = tmp_path / "continued"
    overrides = [*PIN_RUN, "steps=6", f"resume={FIXTURES / 'tiny_v2.pt'}"]
    losses = train_for_pin(compose("train", overrides), run, overrides)
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt", "step_000006.pt"]
