import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_bad_files, write_random, write_truncated
from PIL import Image

from ddpm.data import build_dataset
from ddpm.data.folder import FolderDataset, find_images
from ddpm.errors import DataError


def test_digits_are_the_sklearn_set_in_minus_one_to_one(compose_cfg):
    cfg = compose_cfg("train")
    ds = build_dataset(cfg.data)
    assert len(ds) == 1797
    x = torch.stack([ds[i][0] for i in range(64)])
    assert x.shape == (64, 1, 8, 8)
    assert x.min() == -1.0 and x.max() == 1.0  # the digits use the full 0..16 range
    from sklearn.datasets import load_digits

    assert [ds[i][1] for i in range(64)] == load_digits().target[:64].tolist()  # each item's class label


@pytest.mark.parametrize(("size", "channels"), [(16, 1), (28, 1), (16, 3)])
def test_digits_resize_and_channels(compose_cfg, size, channels):
    cfg = compose_cfg("train", [f"data.image_size={size}", f"data.channels={channels}"])
    x = build_dataset(cfg.data)[0][0]
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
        x, label = ds[i]
        assert x.shape == (channels, 16, 16) and label is None  # a folder's images carry no label
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
    x = build_dataset(cfg.data)[0][0]
    assert torch.all(x == 1.0)


def test_items_are_the_same_on_every_read_even_with_hflip(compose_cfg, tmp_path):
    # The flips are drawn by the data order (order.py), so a resumed run sees the same images.
    img = np.zeros((8, 8), dtype=np.uint8)
    img[:, :4] = 255
    Image.fromarray(img).save(tmp_path / "half.png")
    ds = build_dataset(folder_cfg(compose_cfg, tmp_path, "data.hflip=true"))
    first = ds[0][0]
    assert torch.all(first[:, :, :4] == 1.0) and torch.all(first[:, :, 4:] == -1.0)
    assert all(torch.equal(ds[0][0], first) for _ in range(50))


def test_folder_that_does_not_exist(compose_cfg, tmp_path):
    cfg = compose_cfg("train", ["data=folder", f"data.root={tmp_path / 'nope'}"])
    with pytest.raises(DataError, match=r"data.root=.*nope is not a folder"):
        build_dataset(cfg.data)


def test_folder_without_images(compose_cfg, tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    cfg = compose_cfg("train", ["data=folder", f"data.root={tmp_path}"])
    with pytest.raises(DataError, match="holds no images"):
        build_dataset(cfg.data)


def folder_cfg(compose_cfg, root: Path, *overrides: str, size: int = 8, channels: int = 1):
    base = ["data=folder", f"data.root={root}", f"data.image_size={size}", f"data.channels={channels}"]
    return compose_cfg("train", base + list(overrides)).data


@pytest.mark.parametrize("name", ["cut.jpg", "cut.png"])
def test_a_truncated_file_opens_but_does_not_decode(tmp_path, name):
    # The case a header-only check (Image.open, verify) misses.
    write_truncated(tmp_path / name)
    with Image.open(tmp_path / name) as img, pytest.raises(OSError):
        img.load()


def test_folder_skips_files_that_cannot_be_read_with_one_warning(compose_cfg, tmp_path, capsys):
    write_bad_files(tmp_path)
    write_random(tmp_path / "ok1.png", seed=1)
    (tmp_path / "sub").mkdir()
    write_random(tmp_path / "sub" / "ok2.jpg", seed=2)
    ds = build_dataset(folder_cfg(compose_cfg, tmp_path))
    assert len(ds) == 2
    assert [p.name for p in ds.paths] == ["ok1.png", "ok2.jpg"]
    assert [p.name for p in ds.skipped] == ["a_cut.jpg", "b_cut.png", "c_text.jpg", "d_empty.png"]
    assert all(ds[i][0].shape == (1, 8, 8) for i in range(len(ds)))
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(
        f"warning: data.root={tmp_path}: skipped 4 of 6 image files that cannot be read: "
    )
    assert "a_cut.jpg (" in lines[0] and "b_cut.png (image file is truncated)" in lines[0]
    assert "c_text.jpg (cannot identify image file)" in lines[0]
    assert "d_empty.png" not in lines[0] and lines[0].endswith(", ...")  # only the first three are named
    assert str(tmp_path / "a_cut.jpg") not in lines[0]  # named relative to data.root


def test_folder_of_good_images_warns_of_nothing(compose_cfg, tmp_path, capsys):
    write_images(tmp_path)
    ds = build_dataset(folder_cfg(compose_cfg, tmp_path))
    assert len(ds) == 4 and ds.skipped == []
    assert capsys.readouterr().err == ""


def test_bad_images_error_names_the_count_and_the_files(compose_cfg, tmp_path):
    write_bad_files(tmp_path)
    write_random(tmp_path / "ok.png")
    with pytest.raises(
        DataError, match=r"4 of 5 image files cannot be read: a_cut\.jpg .*data\.bad_images=skip"
    ):
        build_dataset(folder_cfg(compose_cfg, tmp_path, "data.bad_images=error"))


@pytest.mark.parametrize("policy", ["skip", "error"])
def test_folder_with_only_unreadable_images(compose_cfg, tmp_path, policy):
    write_bad_files(tmp_path)
    with pytest.raises(
        DataError, match=r"holds no readable image \(4 image files failed to open: a_cut\.jpg \(.*c_text\.jpg"
    ):
        build_dataset(folder_cfg(compose_cfg, tmp_path, f"data.bad_images={policy}"))


def test_a_folder_read_without_a_data_config_skips_bad_files(tmp_path):
    # ddpm-eval reads a folder of samples by its path and the real set's shape: skip, white background.
    write_random(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"")
    assert len(FolderDataset(str(tmp_path), image_size=8, channels=3, key="samples")) == 1
    with pytest.raises(DataError, match=r"samples=.*missing is not a folder"):
        FolderDataset(str(tmp_path / "missing"), image_size=8, channels=3, key="samples")


@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_grayscale_is_scaled_not_clipped(compose_cfg, tmp_path, channels):
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a_8bit.png")
    wide = pixels.astype(np.uint16) * 257
    Image.fromarray(wide).save(tmp_path / "b_16bit.png")
    Image.fromarray(wide).save(tmp_path / "c_16bit.pgm")
    assert Image.open(tmp_path / "b_16bit.png").mode == "I;16"
    assert Image.open(tmp_path / "c_16bit.pgm").mode == "I"
    ds = build_dataset(folder_cfg(compose_cfg, tmp_path, channels=channels))
    assert torch.equal(ds[1][0], ds[0][0]) and torch.equal(ds[2][0], ds[0][0])


def write_see_through(root: Path) -> None:
    """RGBA, LA and palette images: the left half opaque, the right half see-through over junk colours."""
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:, :4] = (200, 100, 50, 255)
    rgba[:, 4:] = (10, 200, 30, 0)
    Image.fromarray(rgba).save(root / "rgba.png")
    Image.fromarray(rgba).convert("LA").save(root / "la.png")
    palette = Image.fromarray(rgba[..., :3]).quantize(colors=2)
    palette.save(root / "p.png", transparency=int(np.asarray(palette)[0, -1]))  # the right half's index
    assert Image.open(root / "p.png").mode == "P" and "transparency" in Image.open(root / "p.png").info


@pytest.mark.parametrize("background", [0, 255])
@pytest.mark.parametrize("channels", [1, 3])
def test_transparent_pixels_take_the_background(compose_cfg, tmp_path, background, channels):
    write_see_through(tmp_path)
    ds = build_dataset(folder_cfg(compose_cfg, tmp_path, f"data.background={background}", channels=channels))
    assert len(ds) == 3
    grey = background / 127.5 - 1.0
    for i in range(3):
        x = ds[i][0]
        assert torch.allclose(x[:, :, 4:], torch.full_like(x[:, :, 4:], grey)), ds.paths[i].name
        assert not torch.allclose(x[:, :, :4], torch.full_like(x[:, :, :4], grey))


@pytest.mark.parametrize("channels", [1, 3])
def test_palette_cmyk_and_rgb_files_of_one_picture_agree(compose_cfg, tmp_path, channels):
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    pixels[:4, :4], pixels[:4, 4:] = (200, 30, 40), (20, 180, 60)
    pixels[4:, :4], pixels[4:, 4:] = (30, 40, 220), (240, 240, 20)
    rgb = Image.fromarray(pixels)
    rgb.save(tmp_path / "a_rgb.png")
    rgb.quantize(colors=4).save(tmp_path / "b_palette.png")
    rgb.convert("CMYK").save(tmp_path / "c_cmyk.jpg", quality=100, subsampling=0)
    assert [Image.open(p).mode for p in sorted(tmp_path.iterdir())] == ["RGB", "P", "CMYK"]
    ds = build_dataset(folder_cfg(compose_cfg, tmp_path, channels=channels))
    assert torch.equal(ds[1][0], ds[0][0])
    assert torch.allclose(ds[2][0], ds[0][0], atol=4 / 127.5)  # JPEG is lossy, even at quality 100


@pytest.mark.parametrize(("orientation", "turns"), [(6, -1), (8, 1)])
def test_exif_orientation_turns_the_image_upright(compose_cfg, tmp_path, orientation, turns):
    # 6: the camera was turned so that the picture must be turned 90 degrees clockwise to show it; 8: counter.
    pixels = np.zeros((8, 8), dtype=np.uint8)
    pixels[0, :] = 255  # the stored top row
    pixels[:, 0] = 128  # and left column, so that every turn and flip differs
    Image.fromarray(pixels).save(tmp_path / "a_plain.png")
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(tmp_path / "b_tagged.png", exif=exif)
    ds = build_dataset(folder_cfg(compose_cfg, tmp_path))
    assert torch.equal(ds[1][0], torch.rot90(ds[0][0], k=turns, dims=(1, 2)))
    assert not torch.equal(ds[1][0], ds[0][0])


@pytest.mark.parametrize("channels", [1, 3])
def test_mixed_sizes_and_modes_give_one_shape(compose_cfg, tmp_path, channels):
    rng = np.random.default_rng(0)

    def noise(*shape: int, dtype: type = np.uint8, high: int = 256) -> np.ndarray:
        return rng.integers(0, high, shape, dtype=dtype)

    Image.fromarray(noise(40, 60, 3)).save(tmp_path / "rgb.jpg")
    Image.fromarray(noise(20, 20)).save(tmp_path / "gray.png")
    Image.fromarray(noise(33, 17, 4)).save(tmp_path / "rgba.png")
    Image.fromarray(noise(12, 30, 3)).convert("LA").save(tmp_path / "la.png")
    Image.fromarray(noise(25, 17, 3)).quantize(colors=16).save(tmp_path / "palette.gif")
    Image.fromarray(noise(30, 10, 3)).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(noise(9, 9)).convert("1").save(tmp_path / "bilevel.bmp")
    Image.fromarray(noise(12, 14, dtype=np.uint16, high=65536)).save(tmp_path / "wide.png")
    Image.fromarray(noise(11, 7, dtype=np.uint16, high=65536)).save(tmp_path / "wide.pgm")
    Image.fromarray(noise(6, 50, 3)).save(tmp_path / "thin.webp")
    ds = build_dataset(folder_cfg(compose_cfg, tmp_path, channels=channels))
    assert len(ds) == 10 and ds.skipped == []
    for i in range(len(ds)):
        x = ds[i][0]
        assert x.shape == (channels, 8, 8), ds.paths[i].name
        assert x.dtype == torch.float32 and x.min() >= -1.0 and x.max() <= 1.0


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
    x, label = ds[5]
    assert x.shape == (1, 28, 28) and x.min() >= -1.0 and x.max() <= 1.0
    assert label == 5  # the idx labels above: i mod 10


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
    assert ds[0][0].shape == (3, 32, 32)
    assert [ds[i][1] for i in range(len(ds))] == [0, 1] * 5  # the label of each image, as an int


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
