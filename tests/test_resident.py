"""A data set held on the device (data.on_device) reads the very batches the DataLoader reads for the same
data order, stores 8-bit images as uint8 without losing a bit, and is refused where it would not fit."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY, run_entry, write_random
from torch.utils.data import Dataset

from ddpm import cli
from ddpm.data import build_dataset, resident
from ddpm.data.batch import Batch
from ddpm.data.order import DataOrder, shard
from ddpm.data.resident import ResidentImages, data_path, holds_on_device, resident_for
from ddpm.errors import ConfigError
from ddpm.training.loop import batches
from ddpm.validate import check_data_fits

CPU = torch.device("cpu")


def run_of(cfg, dataset, start: int, rank: int, world: int) -> SimpleNamespace:
    """What loop.batches reads of a Run."""
    runtime = SimpleNamespace(rank=rank, world_size=world, device=CPU)
    order = DataOrder(len(dataset), cfg.batch_size, cfg.seed, cfg.data.hflip)
    return SimpleNamespace(cfg=cfg, dataset=dataset, order=order, start=start, runtime=runtime)


def first(stream, n: int) -> list[Batch]:
    out = [next(stream) for _ in range(n)]
    stream.close()
    return out


@pytest.mark.parametrize(("start", "rank", "world"), [(0, 0, 1), (3, 0, 1), (2, 1, 2)])
def test_resident_batches_are_the_loaders(compose_cfg, start, rank, world):
    # 1,797 digits in batches of 300: 5 steps an epoch, so 12 steps cross two epoch boundaries
    base = ["batch_size=300", "data.hflip=true", "seed=3"]
    read = {}
    for on in ("true", "false"):
        cfg = compose_cfg("train", [*base, f"data.on_device={on}"])
        dataset = build_dataset(cfg.data)
        read[on] = first(batches(run_of(cfg, dataset, start, rank, world)), 12)
    images = [b.images for b in read["true"]]
    assert all(x.shape == (300 // world, 1, 8, 8) and x.dtype == torch.float32 for x in images)
    for a, b in zip(read["true"], read["false"], strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    # each image comes with its own label: the labels of the data order's indices, this rank's slice
    order = run_of(cfg, dataset, start, rank, world).order
    for got, (index, _) in zip(read["true"], order.steps(start), strict=False):
        assert torch.equal(got.labels, dataset.labels[shard(index, rank, world)])


def test_flips_are_applied_where_the_order_says(compose_cfg):
    cfg = compose_cfg("train", ["batch_size=300", "data.hflip=true"])
    dataset = build_dataset(cfg.data)
    order = DataOrder(len(dataset), 300, cfg.seed, True)
    index, flips = next(order.steps(0))
    x = next(ResidentImages.from_dataset(dataset, CPU).batches(order, 0)).images
    plain = torch.stack([dataset[int(i)][0] for i in index])
    assert 0 < int(flips.sum()) < 300
    assert torch.equal(x[flips], plain[flips].flip(-1)) and torch.equal(x[~flips], plain[~flips])


def test_a_folder_of_8bit_images_is_held_as_uint8_exactly(compose_cfg, tmp_path):
    for i in range(6):
        write_random(tmp_path / f"{i}.png", shape=(12, 10, 3), seed=i)
    cfg = compose_cfg("train", ["data=folder", f"data.root={tmp_path}", "data.image_size=8"])
    dataset = build_dataset(cfg.data)
    held = ResidentImages.from_dataset(dataset, CPU)
    assert held.images.dtype == torch.uint8 and held.nbytes == 6 * 3 * 8 * 8 and held.labels is None
    assert torch.equal(held.decode(held.images), torch.stack([dataset[i][0] for i in range(6)]))


def test_digits_are_on_the_8bit_grid_too(compose_cfg):
    # sets.py turns the 0 ... 16 intensities into 8-bit pixels before the transform
    dataset = build_dataset(compose_cfg("train").data)
    held = ResidentImages.from_dataset(dataset, CPU)
    assert held.images.dtype == torch.uint8
    assert torch.equal(held.decode(held.images[:50]), torch.stack([dataset[i][0] for i in range(50)]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_batches_held_on_a_gpu_never_wait_for_it(compose_cfg):
    cfg = compose_cfg("train", ["batch_size=300", "data.hflip=true"])
    dataset = build_dataset(cfg.data)
    order = DataOrder(len(dataset), 300, cfg.seed, True)
    stream = ResidentImages.from_dataset(dataset, torch.device("cuda")).batches(order, 0)
    next(stream)  # the first step allocates the pinned host buffer
    torch.cuda.set_sync_debug_mode("error")  # any host sync raises
    try:
        held = [next(stream) for _ in range(6)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    on_cpu = first(ResidentImages.from_dataset(dataset, CPU).batches(order, 1), 6)
    assert all(torch.equal(a.images.cpu(), b.images) for a, b in zip(held, on_cpu, strict=True))
    assert all(torch.equal(a.labels.cpu(), b.labels) for a, b in zip(held, on_cpu, strict=True))


class Floats(Dataset):
    """Five images, the last of them off the 8-bit grid."""

    def __init__(self) -> None:
        grid = torch.arange(5 * 12).reshape(5, 1, 3, 4).float() / 255 * 2 - 1
        self.x = grid.clone()
        self.x[4, 0, 0, 0] = 0.123

    def __len__(self) -> int:
        return 5

    def __getitem__(self, i: int) -> tuple[torch.Tensor, None]:
        return self.x[i], None


def test_a_set_off_the_8bit_grid_is_held_as_the_float32_it_gives(monkeypatch):
    monkeypatch.setattr(resident, "BUILD_BATCH", 2)  # the grid ends in the third chunk
    held = ResidentImages.from_dataset(Floats(), CPU)
    assert held.images.dtype == torch.float32
    assert torch.equal(held.images, Floats().x)


def test_true_over_the_limit_is_refused_before_any_work(compose_cfg):
    # 1,797 digits of 8x8x1 take 0.11 MiB
    cfg = compose_cfg("train", ["data.on_device=true", "data.on_device_max_mb=0.05"])
    dataset = build_dataset(cfg.data)
    with pytest.raises(
        ConfigError, match=r"data.on_device=true is refused: .* 0.1 MiB .*on_device_max_mb=0.05;"
    ):
        check_data_fits(cfg, dataset, None)
    check_data_fits(compose_cfg("train", ["data.on_device=true", "data.on_device_max_mb=0.2"]), dataset, None)


def test_auto_holds_what_fits_and_small_folders(compose_cfg, monkeypatch):
    data = compose_cfg("train").data
    assert holds_on_device(data, 1797) and data_path(data, 1797, CPU) == "held on cpu"
    limit = compose_cfg("train", ["data.on_device_max_mb=0.1"]).data
    assert not holds_on_device(limit, 1797) and data_path(limit, 1797, CPU) == "DataLoader, 0 workers"
    assert not holds_on_device(compose_cfg("train", ["data.on_device=false"]).data, 1797)
    folder = compose_cfg("train", ["data=folder", "data.root=x", "data.image_size=8"]).data
    assert holds_on_device(folder, 100)
    monkeypatch.setattr(resident, "FOLDER_AUTO_MAX_IMAGES", 99)
    assert not holds_on_device(folder, 100)


def test_resident_for_builds_only_when_held(compose_cfg):
    on, off = (compose_cfg("train", [f"data.on_device={v}"]) for v in ("true", "false"))
    dataset = build_dataset(on.data)
    assert isinstance(resident_for(on.data, dataset, CPU), ResidentImages)
    assert resident_for(off.data, dataset, CPU) is None


def test_both_data_paths_train_the_same_losses(tmp_path, capsys):
    quick = [*TINY, "batch_size=300", "data.hflip=true", "steps=7", "timesteps=20", "sample_every=0"]
    losses, headers = {}, {}
    for on in ("true", "false"):
        run = tmp_path / on
        code, _, output = run_entry(
            cli.train_main, [*quick, "forward_n=0", f"data.on_device={on}", f"hydra.run.dir={run}"], capsys
        )
        assert code == 0, output
        rows = (run / "metrics.jsonl").read_text().splitlines()
        losses[on] = [json.loads(row)["loss"] for row in rows]
        headers[on] = (run / "train.log").read_text().splitlines()[0]
    assert len(losses["true"]) == 7 and losses["true"] == losses["false"]
    assert "(1,797 images, held on cpu)" in headers["true"]
    assert "(1,797 images, DataLoader, 0 workers)" in headers["false"]
