"""ddpm-eval: feature spaces, the reports and the failure paths."""

import json

import pytest
import torch
from conftest import TINY, compose

from ddpm.data import build_dataset, load_subset
from ddpm.errors import ConfigError, FeatureError
from ddpm.evaluation.evaluate import evaluate
from ddpm.evaluation.features import classifier_extractor, fid_inception, pixel_extractor
from ddpm.evaluation.metrics import fid
from ddpm.training.loop import train


@pytest.fixture(scope="module")
def digits():
    return build_dataset(compose("train").data)


@pytest.mark.slow
def test_classifier_features_rank_real_above_noise(digits, tmp_path):
    images, labels = load_subset(digits, 1797, seed=0)
    extract, accuracy = classifier_extractor(
        images[:1200], labels[:1200], tmp_path / "clf.pt", steps=600, seed=0
    )
    assert accuracy > 0.85
    held_out = images[1200:]
    reference = images[:600]
    noise = torch.rand_like(held_out) * 2 - 1
    real_fid = fid(extract(reference), extract(held_out))
    noise_fid = fid(extract(reference), extract(noise))
    assert noise_fid > 20 * real_fid
    # cached: the second call reads the file and gives the same features
    again, acc2 = classifier_extractor(images[:10], None, tmp_path / "clf.pt", steps=600, seed=0)
    assert acc2 == accuracy and torch.allclose(again(held_out[:5]), extract(held_out[:5]))


def test_pixel_features_are_the_pixels_and_rank_real_above_noise(digits):
    images, _ = load_subset(digits, 1000, seed=0)
    extract = pixel_extractor()
    assert torch.equal(extract(images[:3]), images[:3].flatten(1))
    real, held_out, noise = images[:500], images[500:], torch.rand(500, 1, 8, 8) * 2 - 1
    assert fid(extract(real), extract(noise)) > 20 * fid(extract(real), extract(held_out))


def test_classifier_needs_labels(tmp_path):
    with pytest.raises(FeatureError, match="needs a labelled data set"):
        classifier_extractor(torch.zeros(4, 1, 8, 8), None, tmp_path / "none.pt", steps=1, seed=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    train(compose("train", TINY + ["steps=2", "sample_every=0", "forward_n=0"]), run)
    return run / "checkpoints" / "last.pt"


def eval_cfg(compose_cfg, tmp_path, *overrides):
    return compose_cfg(
        "eval",
        [
            f"classifier_cache={tmp_path / 'cache'}",
            "classifier_steps=50",
            "n=40",
            "n_real=200",
            "kid_subsets=5",
            "kid_subset_size=30",
            "sample_steps=5",
            "sampler=ddim",
            "device=cpu",
            *overrides,
        ],
    )


def test_evaluate_a_checkpoint_writes_eval_json(compose_cfg, checkpoint, tmp_path):
    report = evaluate(eval_cfg(compose_cfg, tmp_path, f"ckpt={checkpoint}", f"out={tmp_path / 'out'}"))
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert (tmp_path / "out" / "samples.png").is_file()
    assert saved["n_fake"] == 40 and saved["n_real"] == 200 and saved["source"]["sampler"] == "ddim"
    clf = saved["features"]["classifier"]
    assert clf["dim"] == 128 and clf["fid"] is None  # 40 images < 128 features: no FID, with a warning
    assert {"kid", "kid_std", "precision", "recall", "classifier_accuracy"} <= set(clf)
    assert report["features"] == saved["features"]


def test_evaluate_a_folder_with_enough_images_reports_fid(compose_cfg, digits, tmp_path):
    from ddpm.images import save_individual

    images, _ = load_subset(digits, 300, seed=5)
    save_individual(images, tmp_path / "pngs")
    cfg = eval_cfg(
        compose_cfg,
        tmp_path,
        f"samples={tmp_path / 'pngs'}",
        "data=digits",
        "n=300",
        "features=[classifier,pixels]",
    )
    report = evaluate(cfg)
    clf = report["features"]["classifier"]
    assert clf["fid"] is not None and clf["fid"] < 5.0  # real digits against real digits
    assert clf["precision"] > 0.8 and clf["recall"] > 0.8
    pixels = report["features"]["pixels"]
    assert pixels["dim"] == 64 and pixels["fid"] is not None  # 300 images > the 8x8 = 64 pixels
    assert report["out"] == str(tmp_path / "eval_pngs")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], "give exactly one of ckpt=PATH"),
        (["samples=x"], "samples=DIR needs data="),
        (["ckpt=x.pt", "features=[clip]"], r"features=\['clip'\] is invalid"),
        (["ckpt=x.pt", "n=1"], "n=1 is invalid"),
        (["ckpt=x.pt", "sampler=euler"], "sampler='euler' is invalid"),
    ],
)
def test_bad_eval_input(compose_cfg, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        evaluate(compose_cfg("eval", overrides))


def test_missing_inception_weights_file(tmp_path):
    with pytest.raises(FeatureError, match=r"inception_weights=.*does not exist"):
        fid_inception(str(tmp_path / "nope.pth"))


def test_inception_download_offline_says_what_to_do(monkeypatch):
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(FeatureError, match=r"could not download .*inception_weights=PATH"):
        fid_inception(None)


@pytest.mark.slow
def test_inception_features_from_a_local_weights_file(tmp_path):
    """The loading code on a file of the real format (random weights: the real ones need a download)."""
    from ddpm.evaluation.features import fid_inception_structure, inception_extractor

    torch.manual_seed(0)
    structure = fid_inception_structure()
    torch.save(structure.state_dict(), tmp_path / "pt_inception.pth")
    extract = inception_extractor(str(tmp_path / "pt_inception.pth"), torch.device("cpu"))
    features = extract(torch.rand(3, 1, 8, 8) * 2 - 1)
    assert features.shape == (3, 2048) and torch.isfinite(features).all()
    (tmp_path / "wrong.pth").write_bytes(b"not a state dict")
    with pytest.raises(FeatureError, match="is not the FID Inception state dict"):
        fid_inception(str(tmp_path / "wrong.pth"))
