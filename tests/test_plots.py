"""loss.png's curves: the smoothed loss follows the logged rows, and a constant learning rate is one line."""

from __future__ import annotations

import math

import pytest

from ddpm.plots import SMOOTHING, draw_lr, save_loss_plot, smoothed, smoothing_weight


def test_a_short_run_is_drawn_as_logged_and_a_long_one_smoothed_up_to_the_cap():
    assert smoothing_weight(15) == 0.0  # the default job's 15 rows: its curve is the rows themselves
    assert smoothing_weight(100) == pytest.approx(0.8)  # a window of 5 rows
    assert smoothing_weight(10_000) == SMOOTHING
    falling = [math.exp(-i / 5) for i in range(15)]
    assert smoothed(falling) == falling


def test_the_debiased_average_of_a_constant_is_the_constant():
    # without the bias correction the first points would be pulled towards 0 (0.1 c, 0.19 c, ...)
    assert smoothed([2.5] * 400) == pytest.approx([2.5] * 400, rel=1e-12)


def test_a_long_falling_curve_lags_by_the_window_only():
    # the EMA of a geometric decay r^i with weight w is, once the bias term w^i has died out,
    # r^i (1 - w) / (1 - w / r): about w / (1 - w) rows behind, here under 1% above the last row
    r = 0.999
    falling = [r**i for i in range(400)]
    w = smoothing_weight(400)
    assert smoothed(falling)[-1] == pytest.approx(falling[-1] * (1 - w) / (1 - w / r), rel=1e-9)
    assert smoothed(falling)[-1] / falling[-1] < 1.01


def test_a_constant_learning_rate_is_drawn_from_zero():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axis = plt.subplots()
    draw_lr(axis, [100, 200, 300], [1e-3, 1e-3, 1e-3])
    assert axis.get_ylim() == pytest.approx((0, 1.1e-3))
    plt.close(fig)


def test_loss_png_is_written(tmp_path):
    rows = [f'{{"step": {s}, "loss": {1 / s}, "lr": 0.001}}' for s in range(100, 1600, 100)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    save_loss_plot(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
