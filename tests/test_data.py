import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.data import DataError, build_dataset, find_images


def test_digits_are_the_sklearn_set_in_minus_one_to_one(compose_cfg):
    cfg = compose_cfg("train")
    ds = build_dataset(cfg.data)
    assert len(ds) == 1797
    x = torch.stack([ds[i] for i in range(64)])
    assert x.shape == (64, 1, 8, 8)
    assert x.min() == -1.0 and x.max() == 1.0  # the digits use the full 0..16 range


@pytest.mark.parametrize(("size", "channels"), [(16, 1), (28, 1), (16, 3)])
def test_digits_resize_and_channels(compose_cfg, size, channels):
    cfg = compose_cfg("train", [f"data.image_size={size}", f"data.channels={channels}"])
    x = build_dataset(cfg.data)[0]
    assert x.shape == (channels, size, size)
    assert x.min() >= -1.0 and x.max() <= 1.0


def write_images(root: Path) -> None:
    """Images of mixed formats, modes, sizes and extension cases, some nested, plus non-images."""
    rng = np.random.default_rng(0)
    (root / "sub" / "deeper").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 255, (50, 30, 3), dtype=np.uint8)).save(root / "b.JPG")
    Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8), mode="L").save(root / "sub" / "c.webp")
    Image.fromarray(rng.integers(0, 255, (33, 33, 4), dtype=np.uint8), mode="RGBA").save(
        root / "sub" / "deeper" / "d.PNG"
    )
    (root / "notes.txt").write_text("not an image")


@pytest.mark.parametrize("channels", [1, 3])
def test_folder_reads_every_image_resized_and_cropped(compose_cfg, tmp_path, channels):
    write_images(tmp_path)
    cfg = compose_cfg(
        "train", ["data=folder", f"data.root={tmp_path}", "data.image_size=16", f"data.channels={channels}"]
    )
    ds = build_dataset(cfg.data)
    assert len(ds) == 4
    for i in range(4):
        x = ds[i]
        assert x.shape == (channels, 16, 16)
        assert x.dtype == torch.float32 and x.min() >= -1.0 and x.max() <= 1.0


def test_folder_finds_extensions_in_any_case_recursively(tmp_path):
    write_images(tmp_path)
    assert [p.name for p in find_images(tmp_path)] == ["a.png", "b.JPG", "c.webp", "d.PNG"]


def test_centre_crop_keeps_the_middle(compose_cfg, tmp_path):
    # A wide image, white in the middle and black at both sides: the centre crop is all white.
    img = np.zeros((30, 90), dtype=np.uint8)
    img[:, 20:70] = 255
    Image.fromarray(img, mode="L").save(tmp_path / "wide.png")
    cfg = compose_cfg(
        "train",
        ["data=folder", f"data.root={tmp_path}", "data.image_size=8", "data.channels=1", "data.hflip=false"],
    )
    x = build_dataset(cfg.data)[0]
    assert torch.all(x == 1.0)


def test_hflip_flips_about_half_the_time(compose_cfg, tmp_path):
    img = np.zeros((8, 8), dtype=np.uint8)
    img[:, :4] = 255
    Image.fromarray(img, mode="L").save(tmp_path / "half.png")
    overrides = ["data=folder", f"data.root={tmp_path}", "data.image_size=8", "data.channels=1"]
    torch.manual_seed(0)
    flipped = build_dataset(compose_cfg("train", overrides + ["data.hflip=true"]).data)
    lefts = [flipped[0][0, 0, 0].item() for _ in range(200)]
    assert 60 < sum(v == 1.0 for v in lefts) < 140
    plain = build_dataset(compose_cfg("train", overrides + ["data.hflip=false"]).data)
    assert all(plain[0][0, 0, 0].item() == 1.0 for _ in range(20))


def test_folder_that_does_not_exist(compose_cfg, tmp_path):
    cfg = compose_cfg("train", ["data=folder", f"data.root={tmp_path / 'nope'}"])
    with pytest.raises(DataError, match=r"data.root=.*nope is not a folder"):
        build_dataset(cfg.data)


def test_folder_without_images(compose_cfg, tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    cfg = compose_cfg("train", ["data=folder", f"data.root={tmp_path}"])
    with pytest.raises(DataError, match="holds no images"):
        build_dataset(cfg.data)


def test_folder_with_only_unreadable_images(compose_cfg, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "empty.jpg").write_bytes(b"")
    cfg = compose_cfg("train", ["data=folder", f"data.root={tmp_path}"])
    with pytest.raises(DataError, match=r"holds no readable image \(2 image files"):
        build_dataset(cfg.data)


def write_idx(raw: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """The MNIST idx-ubyte format: big-endian magic, dimensions, then the bytes."""
    raw.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, h, w) + images.tobytes())
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_like_sets_load_from_their_files(compose_cfg, tmp_path, name, folder):
    rng = np.random.default_rng(0)
    raw = tmp_path / folder / "raw"
    for prefix, n in [("train", 12), ("t10k", 3)]:
        write_idx(
            raw, prefix, rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n, dtype=np.uint8) % 10
        )
    cfg = compose_cfg("train", [f"data={name}", f"data.root={tmp_path}", "data.download=false"])
    ds = build_dataset(cfg.data)
    assert len(ds) == 12  # the training split
    x = ds[5]
    assert x.shape == (1, 28, 28) and x.min() >= -1.0 and x.max() <= 1.0


def test_cifar10_loads_from_its_python_batches(compose_cfg, tmp_path, monkeypatch):
    from torchvision.datasets import cifar

    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [0, 1]}
        (base / name).write_bytes(pickle.dumps(batch))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
    # Our files are in the real format but not the real bytes, so the md5 check is the one thing skipped.
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    cfg = compose_cfg("train", ["data=cifar10", f"data.root={tmp_path}", "data.download=false"])
    ds = build_dataset(cfg.data)
    assert len(ds) == 10
    assert ds[0].shape == (3, 32, 32)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_missing_torchvision_set_without_download_says_what_to_do(compose_cfg, tmp_path, name):
    cfg = compose_cfg("train", [f"data={name}", f"data.root={tmp_path}", "data.download=false"])
    with pytest.raises(DataError, match=rf"data={name}: .*is not there.*data=folder.*data=digits"):
        build_dataset(cfg.data)


def test_download_without_network_says_so(compose_cfg, tmp_path, monkeypatch):
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    cfg = compose_cfg("train", ["data=mnist", f"data.root={tmp_path}", "data.download=true"])
    with pytest.raises(DataError, match=r"could not be downloaded \(no network\?\)"):
        build_dataset(cfg.data)
