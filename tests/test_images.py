import torch
from PIL import Image

from ddpm.diffusion.gaussian import Diffusion
from ddpm.diffusion.schedules import Schedule, linear_betas
from ddpm.images import (
    display_scale,
    forward_figure,
    forward_timesteps,
    grid_image,
    save_grid,
    save_individual,
)


def test_small_images_are_enlarged_in_grids_only(tmp_path):
    images = torch.rand(10, 1, 8, 8) * 2 - 1
    save_grid(images, tmp_path / "grid.png")
    grid = Image.open(tmp_path / "grid.png")
    # 4 columns x 3 rows of 32 px cells (8 px x 4) with 2 px padding
    assert grid.size == (4 * 34 + 2, 3 * 34 + 2) and grid.mode == "L"
    save_individual(images, tmp_path / "images")
    files = sorted((tmp_path / "images").iterdir())
    assert [f.name for f in files] == [f"{i:05d}.png" for i in range(10)]
    assert Image.open(files[0]).size == (8, 8)


def test_large_rgb_images_keep_their_size():
    assert display_scale(64) == 1 and display_scale(28) == 2 and display_scale(8) == 4
    grid = grid_image(torch.zeros(4, 3, 40, 40))
    assert grid.size == (2 * 42 + 2, 2 * 42 + 2) and grid.mode == "RGB"


def test_pixel_values_map_minus_one_to_black_and_one_to_white(tmp_path):
    images = torch.stack([torch.full((1, 2, 2), -1.0), torch.full((1, 2, 2), 1.0)])
    save_individual(images, tmp_path)
    assert Image.open(tmp_path / "00000.png").getpixel((0, 0)) == 0
    assert Image.open(tmp_path / "00001.png").getpixel((1, 1)) == 255


def test_forward_timesteps_span_zero_to_T():
    assert forward_timesteps(200, 9) == [0, 25, 50, 75, 100, 125, 150, 175, 200]
    assert forward_timesteps(3, 9) == [0, 1, 2, 3]
    assert forward_timesteps(1, 9) == [0, 1]


def test_forward_figure_shows_clean_then_noisier_images():
    schedule = Schedule.from_betas(linear_betas(1000, 1e-4, 0.02))
    x0 = torch.zeros(3, 1, 8, 8)
    figure = forward_figure(Diffusion(schedule), x0, seed=0, columns=5)
    cell = 8 * 4 + 2
    assert figure.size == (5 * cell + 2, 14 + 3 * cell + 2)
    # column 0 is x_0 (uniform grey); the last column is almost pure noise
    first = [figure.getpixel((2 + x, 14 + 2 + y)) for x in range(32) for y in range(32)]
    last = [figure.getpixel((2 + 4 * cell + x, 14 + 2 + y)) for x in range(32) for y in range(32)]
    assert len(set(first)) == 1
    assert len(set(last)) > 10
