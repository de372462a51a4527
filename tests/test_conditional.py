"""Class-conditional models and classifier-free guidance: the label embedding of both U-Nets, the label-drop
mask of the step, guidance against its definition on every sampler, the labels of every labelled set, and
conditional runs and samples through the real entry points."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import COND_RUN, TINY, assert_refused, compose, run_entry, write_random
from PIL import Image

from ddpm import cli
from ddpm.checkpoint import load_checkpoint
from ddpm.conditioning import grid_rows, labels_in_rows, sample_labels
from ddpm.data import build_dataset
from ddpm.data.batch import Batch
from ddpm.diffusion.gaussian import Diffusion, guided_output
from ddpm.diffusion.generate import generate
from ddpm.diffusion.sampling import SamplingOptions
from ddpm.diffusion.schedules import Schedule
from ddpm.errors import ConfigError, DataError
from ddpm.images import DISPLAY_MIN_PX
from ddpm.models import build_model
from ddpm.runtime import Runtime
from ddpm.trained import TrainedModel, load_trained
from ddpm.training.loop import train
from ddpm.training.step import StepOptions, TrainStep, build_optimizer, step_draws

HO = [
    "model=ho2020",
    "model.dim=32",
    "model.dim_mults=[1,2]",
    "model.num_res_blocks=1",
    "model.attn_resolutions=[4]",
]
MODELS = {"unet": TINY, "ho2020": [k for k in TINY if not k.startswith("model.")] + HO}
SAMPLERS = ["ddpm", "ddim", "dpm_solver++"]


def network(name: str, num_classes: int | None, seed: int = 0) -> torch.nn.Module:
    cfg = compose("train", MODELS[name])
    torch.manual_seed(seed)
    return build_model(cfg.model, 1, 8, num_classes).eval()


# ---------------------------------------------------------------------------------------- the networks
@pytest.mark.parametrize("name", MODELS)
def test_a_conditional_unet_adds_the_label_to_the_time_embedding(name):
    plain, cond = network(name, None), network(name, 10)
    # the embedding is built last: every other weight is the unconditional U-Net's, drawn alike
    extra = set(cond.state_dict()) - set(plain.state_dict())
    assert extra == {"label_emb.embed.weight"}
    assert cond.state_dict()["label_emb.embed.weight"].shape == (11, cond.label_emb.embed.embedding_dim)
    assert all(torch.equal(v, cond.state_dict()[k]) for k, v in plain.state_dict().items())
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 5, 10, 19])
    labels = torch.tensor([0, 3, 9, 10])
    with torch.no_grad():
        out = cond(x, t, labels)
        # no labels is the null label (index 10) for every image
        assert torch.equal(cond(x, t), cond(x, t, torch.full((4,), 10)))
        assert not torch.allclose(out, cond(x, t, torch.tensor([1, 4, 8, 10])))
        # an unconditional U-Net ignores labels
        assert torch.equal(plain(x, t, labels), plain(x, t))
        # zero label vectors make the conditional U-Net the unconditional one
        cond.label_emb.embed.weight.zero_()
        torch.testing.assert_close(cond(x, t, labels), plain(x, t), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- the step
def test_the_drop_mask_comes_after_t_and_eps_and_only_in_conditional_runs():
    diffusion = Diffusion(Schedule.from_betas(torch.linspace(1e-4, 0.02, 20)))
    shape, cpu = (4000, 1, 2, 2), torch.device("cpu")
    t0, eps0, none = step_draws(diffusion, 3, 7, shape, cpu)
    t1, eps1, drop = step_draws(diffusion, 3, 7, shape, cpu, cond_drop_prob=0.1)
    assert none is None and torch.equal(t0, t1) and torch.equal(eps0, eps1)
    # 400 expected of 4,000: a binomial with sd 19, so 5 sd either way
    assert drop.dtype == torch.bool and 305 < int(drop.sum()) < 495
    assert not step_draws(diffusion, 3, 7, shape, cpu, cond_drop_prob=0.0)[2].any()
    assert torch.equal(step_draws(diffusion, 3, 7, shape, cpu, cond_drop_prob=0.1)[2], drop)
    assert not torch.equal(step_draws(diffusion, 3, 8, shape, cpu, cond_drop_prob=0.1)[2], drop)


def conditional_step(rank: int = 0, world: int = 1, drop: float = 0.5) -> tuple[TrainStep, Batch]:
    cfg = compose("train", TINY + ["class_cond=true", f"cond_drop_prob={drop}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 1, 8, 10)
    runtime = Runtime(torch.device("cpu"), rank=rank, world_size=world)
    step = TrainStep(
        model,
        model,
        build_optimizer(model, cfg.lr, runtime.device),
        Diffusion.from_config(cfg),
        None,
        StepOptions.from_config(cfg, num_classes=10),
        runtime,
    )
    x0 = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return step, Batch(x0, torch.arange(16) % 10)


def test_the_step_replaces_the_dropped_labels_with_the_null_label():
    step, batch = conditional_step()
    inputs = step.draws(4, batch)
    shape = (16, *batch.images.shape[1:])
    _, _, drop = step_draws(step.diffusion, step.opts.seed, 4, shape, torch.device("cpu"), 0.5)
    assert torch.equal(inputs.batch.labels, torch.where(drop, 10, batch.labels))
    assert 0 < int(drop.sum()) < 16 and torch.equal(inputs.batch.images, batch.images)
    # each rank drops its slice of the one global mask
    halves = [conditional_step(rank, 2)[0].draws(4, batch.shard(rank, 2)).batch.labels for rank in (0, 1)]
    assert torch.equal(torch.cat(halves), inputs.batch.labels)
    # an unconditional step takes no labels: a labelled set's are dropped
    step.opts = StepOptions.from_config(compose("train", TINY))
    assert step.draws(4, batch).batch.labels is None


# ------------------------------------------------------------------------------------------- guidance
class Affine(torch.nn.Module):
    """out = x * (1 + label) + t, recording the batch size of every call."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def forward(self, x, t, labels=None):
        self.sizes.append(x.shape[0])
        return x * (1 + labels.float().view(-1, 1, 1, 1)) + t.float().view(-1, 1, 1, 1)


def test_guidance_is_the_affine_combination_in_one_doubled_pass():
    model, x, t = Affine(), torch.randn(3, 1, 2, 2), torch.tensor([1, 2, 3])
    labels, null = torch.tensor([0, 1, 2]), 5
    cond, uncond = model(x, t, labels), model(x, t, torch.full((3,), null))
    model.sizes.clear()
    for s in (0.5, 2.0, 7.0):
        out = guided_output(model, labels, s, null)(x, t)
        torch.testing.assert_close(out, uncond + s * (cond - uncond))
    assert model.sizes == [6, 6, 6]  # one pass over 2B images per call
    model.sizes.clear()
    assert torch.equal(guided_output(model, labels, 1.0, null)(x, t), cond)
    assert torch.equal(guided_output(model, labels, 0.0, null)(x, t), uncond)
    assert model.sizes == [3, 3]  # s = 1 and s = 0 take one B-sized pass


def trained_model(name: str = "unet", guidance: float = 3.0) -> TrainedModel:
    diffusion = Diffusion(Schedule.from_betas(torch.linspace(1e-4, 0.2, 20)))
    names = tuple(str(i) for i in range(10))
    return TrainedModel(network(name, 10), diffusion, (1, 8, 8), names, None, 0, "model", guidance, True)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("name", MODELS)
def test_guidance_on_every_sampler(sampler, name):
    trained = trained_model(name)
    labels = torch.tensor([0, 3, 7, 9])
    opts = SamplingOptions(sampler=sampler, sample_steps=5)
    with_scale = {s: SamplingOptions(sampler=sampler, sample_steps=5, guidance_scale=s) for s in (0, 1, 3)}
    # s = 1: the conditional model itself, bit for bit
    plain = TrainedModel(trained.network, trained.diffusion, trained.shape, trained.class_names)
    assert torch.equal(
        generate(trained, with_scale[1], 4, 0, 4, labels), generate(plain, opts, 4, 0, 4, labels)
    )
    # s = 0: the null label alone
    null = torch.full((4,), 10)
    assert torch.equal(
        generate(trained, with_scale[0], 4, 0, 4, labels), generate(plain, opts, 4, 0, 4, null)
    )
    # s = 3 (and None, the model's default of 3): one 2B pass equals two B passes at float32 rounding
    guided = generate(trained, with_scale[3], 4, 0, 4, labels)
    assert torch.equal(generate(trained, opts, 4, 0, 4, labels), guided)
    network = trained.network

    class TwoPasses(torch.nn.Module):
        def forward(self, x, t, labels):
            b = x.shape[0] // 2
            return torch.cat([network(x[:b], t[:b], labels[:b]), network(x[b:], t[b:], labels[b:])])

    two = TrainedModel(
        TwoPasses(), trained.diffusion, trained.shape, trained.class_names, None, 0, "model", 3.0, True
    )
    torch.testing.assert_close(generate(two, with_scale[3], 4, 0, 4, labels), guided, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(guided, generate(plain, opts, 4, 0, 4, labels))


# ------------------------------------------------------------------------------------------ the labels
def test_labels_in_rows_and_the_training_grid():
    assert labels_in_rows([3, 1], 6).tolist() == [3, 3, 3, 1, 1, 1]
    with pytest.raises(ConfigError, match=r"n=7 is not a multiple of the 2 labels.*give n=6 or n=8"):
        labels_in_rows([3, 1], 7)
    with pytest.raises(ConfigError, match=r"n=3 is not a multiple of the 5 labels.*give n=5$"):
        labels_in_rows([0, 1, 2, 3, 4], 3)
    labels, ncol = grid_rows(10, 64)  # every class, 6 each
    assert ncol == 6 and labels.tolist() == [c for c in range(10) for _ in range(6)]
    labels, ncol = grid_rows(100, 8)  # more classes than images: the first 8, one each
    assert ncol == 1 and labels.tolist() == list(range(8))


def class_folder(root, classes: dict[str, int]) -> None:
    for i, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for j in range(count):
            write_random(root / name / f"{j}.png", (8, 8, 3), seed=10 * i + j)


def folder_data(root, extra: list[str] = ()):
    return compose("train", ["data=folder", f"data.root={root}", "data.image_size=8", *extra]).data


def test_a_folder_of_class_folders_gives_sorted_classes_and_labels(tmp_path):
    class_folder(tmp_path, {"dog": 2, "cat": 3, "bird": 1})
    (tmp_path / "cat" / "deeper").mkdir()
    write_random(tmp_path / "cat" / "deeper" / "x.png", (8, 8, 3), seed=99)
    ds = build_dataset(folder_data(tmp_path), labels=True)
    assert ds.classes == ("bird", "cat", "dog")
    by_label = {ds.paths[i].relative_to(tmp_path).as_posix(): ds[i][1] for i in range(len(ds))}
    assert by_label == {
        "bird/0.png": 0,
        "cat/0.png": 1,
        "cat/1.png": 1,
        "cat/2.png": 1,
        "cat/deeper/x.png": 1,
        "dog/0.png": 2,
        "dog/1.png": 2,
    }
    # torchvision's ImageFolder labels the same files the same way
    from torchvision.datasets import ImageFolder

    reference = ImageFolder(str(tmp_path))
    assert tuple(reference.classes) == ds.classes
    assert {p: y for p, y in reference.samples} == {str(tmp_path / k): v for k, v in by_label.items()}
    # an unconditional run reads no labels
    plain = build_dataset(folder_data(tmp_path))
    assert plain.labels is None and plain[0][1] is None


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda r: write_random(r / "top.png", (8, 8, 3)), r"holds images at its top level \(top.png\)"),
        (lambda r: (r / "empty").mkdir(), r"the class folder .*/empty holds no images"),
        (lambda r: (r / ".cache").mkdir(), r"the class folder .*/\.cache holds no images"),
    ],
)
def test_a_folder_that_is_not_one_subfolder_per_class_is_refused(tmp_path, make, message):
    class_folder(tmp_path, {"a": 1, "b": 1})
    make(tmp_path)
    with pytest.raises(DataError, match=message):
        build_dataset(folder_data(tmp_path), labels=True)


def test_one_class_is_not_a_conditional_set(tmp_path):
    class_folder(tmp_path, {"only": 2})
    with pytest.raises(DataError, match=r"two or more classes.*one subfolder \(only\)"):
        build_dataset(folder_data(tmp_path), labels=True)


def test_every_labelled_set_names_its_classes(tmp_path, monkeypatch):
    digits = build_dataset(compose("train").data, labels=True)
    assert digits.classes == tuple("0123456789") and digits[0][1] == 0
    # the torchvision sets in their own file formats (as tests/test_data.py writes them)
    from test_data import write_idx
    from torchvision.datasets import cifar

    rng = np.random.default_rng(0)
    for folder in ("MNIST", "FashionMNIST"):
        for prefix, n in [("train", 12), ("t10k", 3)]:
            images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
            write_idx(tmp_path / folder / "raw", prefix, images, np.arange(n, dtype=np.uint8) % 10)
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    import pickle

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [4, 9]}
        (base / name).write_bytes(pickle.dumps(batch))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    expected = {
        "mnist": ("0 - zero", 5),
        "fashion_mnist": ("T-shirt/top", 5),
        "cifar10": ("airplane", 9),
    }
    for name, (first, label) in expected.items():
        data = compose("train", [f"data={name}", f"data.root={tmp_path}", "data.download=false"]).data
        ds = build_dataset(data, labels=True)
        assert len(ds.classes) == 10 and ds.classes[0] == first and ds[5][1] == label, name


# --------------------------------------------------------------------------------- runs, end to end
def test_a_conditional_run_stores_its_classes_and_draws_a_row_per_class(cond_ckpt):
    payload = load_checkpoint(cond_ckpt)
    assert payload["class_names"] == list("0123456789")
    assert payload["config"]["class_cond"] is True and payload["config"]["guidance_scale"] == 2.0
    assert "label_emb.embed.weight" in payload["model"] and "label_emb.embed.weight" in payload["ema"]
    trained = load_trained(cond_ckpt, torch.device("cpu"))
    assert trained.class_names == tuple("0123456789") and trained.default_guidance == 2.0
    assert trained.null_trained
    # sample_n=20 and 10 classes: 10 rows of 2, each cell enlarged to 32 px with 2 px between
    grid = Image.open(cond_ckpt.parent.parent / "samples" / "step_000004.png")
    cell = DISPLAY_MIN_PX + 2
    assert grid.size == (2 * cell + 2, 10 * cell + 2)


def test_ddpm_sample_draws_the_labels_asked_for_in_rows(
    cond_ckpt, never_dropped_ckpt, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    code, lines, output = run_entry(
        cli.sample_main, [f"ckpt={cond_ckpt}", "labels=[3,'7']", "n=6", "out=a", "save_images=true"], capsys
    )
    assert code == 0, output
    assert "3 each of 3, 7, guidance 2" in output
    grid = Image.open(tmp_path / "a" / "grid.png")
    cell = DISPLAY_MIN_PX + 2
    assert grid.size == (3 * cell + 2, 2 * cell + 2)
    # the same images as the library draws for those labels
    trained = load_trained(cond_ckpt, torch.device("cpu"))
    cfg = compose("sample", [f"ckpt={cond_ckpt}"])
    images = generate(trained, SamplingOptions.from_config(cfg), 6, 0, 256, torch.tensor([3, 3, 3, 7, 7, 7]))
    saved = sorted((tmp_path / "a" / "images").iterdir())
    first = torch.from_numpy(np.array(Image.open(saved[0]))).float() / 127.5 - 1
    torch.testing.assert_close(first, images[0, 0].clamp(-1, 1), atol=1 / 127.5, rtol=0)
    # without labels, every class in turn; on a cond_drop_prob=0 checkpoint, guidance 1 works
    code, _, output = run_entry(cli.sample_main, [f"ckpt={never_dropped_ckpt}", "n=10", "out=b"], capsys)
    assert code == 0 and "1 each of 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, guidance 1" in output, output
    # without n, one row of 8 per class drawn: every class, or those asked for
    for labels, rows in [([], 10), (["labels=[2,5]"], 2)]:
        code, _, output = run_entry(cli.sample_main, [f"ckpt={cond_ckpt}", *labels, "out=c"], capsys)
        assert code == 0 and f"ddpm-sample: {8 * rows} samples" in output and "8 each of" in output, output
        assert Image.open(tmp_path / "c" / "grid.png").size == (8 * cell + 2, rows * cell + 2)
    for sampler in ["ddim", "dpm_solver++"]:
        args = [
            f"ckpt={cond_ckpt}",
            "labels=1",
            "n=2",
            f"sampler={sampler}",
            "guidance_scale=4",
            f"out={sampler}",
        ]
        code, _, output = run_entry(cli.sample_main, args, capsys)
        assert code == 0 and "guidance 4" in output, output


def test_an_unconditional_checkpoint_draws_an_8x8_grid_without_n():
    from conftest import FIXTURES

    plain = load_trained(FIXTURES / "tiny_v2.pt", torch.device("cpu"))
    assert sample_labels(plain, None, None) == (None, None, 64)
    assert sample_labels(plain, None, 5) == (None, None, 5)


BAD_CONDITIONAL_SAMPLE = [
    (["ckpt=plain", "labels=3"], "labels=3 is refused: the checkpoint is unconditional"),
    (["ckpt=plain", "guidance_scale=1"], "guidance_scale=1.0 is refused: the checkpoint is unconditional"),
    (["ckpt=never", "guidance_scale=2"], "the checkpoint was trained with cond_drop_prob=0"),
    (["ckpt=cond", "labels=10", "n=2"], "labels: class 10 is out of range: the model has 10 classes"),
    (["ckpt=cond", "labels=[cat]", "n=2"], "labels: 'cat' is not a class of the model; its classes: 0, 1"),
    (["ckpt=cond", "labels=[1,2]", "n=3"], "n=3 is not a multiple of the 2 labels"),
    (["ckpt=cond", "n=64"], "n=64 is not a multiple of the 10 classes of the checkpoint (labels=null: all)"),
    (["ckpt=cond", "labels=[]"], "labels=[] is invalid"),
    (["ckpt=cond", "guidance_scale=-1"], "guidance_scale=-1.0 is invalid: it must be >= 0"),
    (["ckpt=cond", "guidance_scale=nan"], "guidance_scale=nan is invalid"),
    (["ckpt=cond", "guidance_scale=inf"], "guidance_scale=inf is invalid"),
]


@pytest.mark.parametrize(
    ("args", "message"), BAD_CONDITIONAL_SAMPLE, ids=[" ".join(a) for a, _ in BAD_CONDITIONAL_SAMPLE]
)
def test_bad_conditional_sampling_is_one_line(
    cond_ckpt, never_dropped_ckpt, tmp_path, monkeypatch, capsys, args, message
):
    from conftest import FIXTURES

    monkeypatch.chdir(tmp_path)
    paths = {"plain": FIXTURES / "tiny_v2.pt", "cond": cond_ckpt, "never": never_dropped_ckpt}
    args = [f"ckpt={paths[a[5:]]}" if a.startswith("ckpt=") else a for a in args]
    code, lines, output = run_entry(cli.sample_main, [*args, "out=out_bad"], capsys)
    assert_refused("ddpm-sample", code, lines, output, args)
    assert code == 2 and message in lines[0], lines
    assert not (tmp_path / "out_bad").exists()


BAD_CONDITIONAL_TRAIN = [
    (["class_cond=true", "data=folder", "data.root=flat"], "holds images at its top level"),
    (["class_cond=true", "cond_drop_prob=1"], "cond_drop_prob=1.0 is invalid: it must lie in [0, 1)"),
    (["class_cond=true", "cond_drop_prob=-0.1"], "cond_drop_prob=-0.1 is invalid"),
    (
        ["class_cond=true", "cond_drop_prob=0", "guidance_scale=2"],
        "guidance_scale=2.0 needs the unconditional model",
    ),
    (["guidance_scale=null"], "guidance_scale=null is invalid for ddpm-train"),
    (["guidance_scale=-2"], "guidance_scale=-2.0 is invalid: it must be >= 0"),
    (["eval.guidance_scale=nan"], "eval.guidance_scale=nan is invalid"),
]


@pytest.mark.parametrize(
    ("args", "message"), BAD_CONDITIONAL_TRAIN, ids=[" ".join(a) for a, _ in BAD_CONDITIONAL_TRAIN]
)
def test_bad_conditional_training_is_one_line_and_writes_nothing(
    tmp_path, monkeypatch, capsys, args, message
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "flat").mkdir()
    for i in range(3):
        write_random(tmp_path / "flat" / f"{i}.png", (8, 8, 3), seed=i)
    code, lines, output = run_entry(cli.train_main, [*args, "steps=1", "hydra.run.dir=run"], capsys)
    assert_refused("ddpm-train", code, lines, output, args)
    assert code == 2 and message in lines[0], lines
    made = [p.relative_to(tmp_path / "run").parts[0] for p in (tmp_path / "run").rglob("*")]
    assert set(made) <= {".hydra"}, made


def test_a_resume_keeps_class_cond_and_the_class_names(tmp_path):
    root = tmp_path / "pics"
    class_folder(root, {"cat": 9, "dog": 9})
    folder = ["data=folder", f"data.root={root}", "data.image_size=8", "data.channels=1", "batch_size=6"]
    base = COND_RUN + folder + ["steps=2", "sample_n=4"]
    train(compose("train", base), tmp_path / "run")
    with pytest.raises(ConfigError, match=r"class_cond"):
        train(
            compose("train", base + ["class_cond=false", "resume=auto", "steps=3"]),
            tmp_path / "run",
            ["class_cond=false"],
        )
    (root / "dog").rename(root / "wolf")
    with pytest.raises(
        ConfigError, match=r"now has \['cat', 'wolf'\].*trained on the classes \['cat', 'dog'\]"
    ):
        train(compose("train", base + ["resume=auto", "steps=3"]), tmp_path / "run", ["resume=auto"])
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2


# ------------------------------------------------------------------------------------- class accuracy
def test_class_accuracy_counts_the_classifier_hits_per_class():
    from ddpm.evaluation.evaluate import class_accuracy

    class Says(torch.nn.Module):
        """Logits that pick the image's first pixel as its class."""

        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 3).float()

    images = torch.tensor([0, 1, 1, 2, 0, 0]).float().view(-1, 1, 1, 1)
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    accuracy, per_class = class_accuracy(Says(), images, labels, ("a", "b", "c"))
    assert accuracy == pytest.approx(4 / 6)
    assert per_class == {"a": 1.0, "b": 0.5, "c": 0.5}
    _, per_class = class_accuracy(Says(), images[:2], labels[:2], ("a", "b", "c"))
    assert per_class["c"] is None  # no image asked for class c


def test_ddpm_eval_of_a_conditional_model_reports_class_accuracy(cond_ckpt, tmp_path, monkeypatch, capsys):
    from conftest import cheap_eval

    from ddpm.evaluation.evaluate import Scorer, real_data_config

    monkeypatch.chdir(tmp_path)
    scoring = [k.removeprefix("eval.") for k in cheap_eval(tmp_path / "cache")]
    args = [f"ckpt={cond_ckpt}", *scoring, "features=[pixels]", "guidance_scale=1.5", "out=ev"]
    code, _, output = run_entry(cli.eval_main, args, capsys)
    assert code == 0, output
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert report["source"]["guidance_scale"] == 1.5
    assert list(report["class_accuracy_per_class"]) == list("0123456789")
    # computed whatever features says, and against the ceiling of the real images
    assert 0 <= report["class_accuracy"] <= 1 and report["class_accuracy_real"] > 0.8
    assert "class accuracy at guidance 1.5:" in output and list(report["features"]) == ["pixels"]
    # the labels asked for are those of n real images picked with the seed: the set's proportions
    cfg = compose("eval", [f"ckpt={cond_ckpt}", *scoring])
    scorer = Scorer(
        cfg,
        real_data_config(load_trained(cond_ckpt, torch.device("cpu")).data),
        torch.device("cpu"),
        ["pixels"],
        labels=True,
    )
    labels = scorer.draw_labels(130, 0)
    order = torch.randperm(1797, generator=torch.Generator().manual_seed(0))[:130]
    assert torch.equal(labels, scorer.labels[order])
    assert scorer.draw_labels(2000, 0).shape == (2000,)  # more than the set: all of them in turn


def test_a_conditional_run_scores_its_class_accuracy(tmp_path):
    from conftest import cheap_eval

    run = tmp_path / "run"
    train(compose("train", COND_RUN + cheap_eval(tmp_path / "cache") + ["eval_at_end=true"]), run)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in rows if "fid_classifier" in r]
    assert len(scored) == 1 and 0 <= scored[0]["class_accuracy"] <= 1
    report = json.loads((run / "eval" / "step_000004" / "eval.json").read_text())
    assert (
        report["source"]["guidance_scale"] == 2.0 and report["class_accuracy"] == scored[0]["class_accuracy"]
    )
    from ddpm.summary import summarise

    assert summarise(tmp_path)[0][0].class_accuracy == scored[0]["class_accuracy"]


def test_a_guidance_sweep_ends_in_the_tradeoff_table_and_plot(cond_ckpt, tmp_path, monkeypatch, capsys):
    from conftest import cheap_eval

    monkeypatch.chdir(tmp_path)
    scoring = [k.removeprefix("eval.") for k in cheap_eval(tmp_path / "cache")]
    args = ["-m", f"ckpt={cond_ckpt}", "guidance_scale=1,3", *scoring, "features=[classifier,pixels]"]
    code, _, output = run_entry(cli.eval_main, [*args, "hydra.sweep.dir=sweep"], capsys)
    assert code == 0, output
    # each job's default out names its scale
    evals = cond_ckpt.parent.parent / "eval"
    reports = {s: json.loads((evals / f"last_seed0_guidance{s}" / "eval.json").read_text()) for s in (1, 3)}
    assert {r["source"]["guidance_scale"] for r in reports.values()} == {1.0, 3.0}
    lines = (tmp_path / "sweep" / "sweep.md").read_text().splitlines()
    assert lines[0].startswith("| ckpt | guidance_scale |") and len(lines) == 4
    cells = {float(line.split(" | ")[1]): line for line in lines[2:]}
    assert f"{reports[3]['class_accuracy']:.4g}" in cells[3.0]
    assert f"{reports[1]['features']['classifier']['fid']:.4g}" in cells[1.0]
    assert Image.open(tmp_path / "sweep" / "guidance.png").size[0] > 600
    assert "sweep of 2 jobs" in output


def test_an_export_keeps_the_class_names(cond_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, output = run_entry(cli.export_main, [f"ckpt={cond_ckpt}", "out=cond.safetensors"], capsys)
    assert code == 0, output
    exported = load_trained(tmp_path / "cond.safetensors", torch.device("cpu"))
    original = load_trained(cond_ckpt, torch.device("cpu"))
    assert exported.class_names == original.class_names and exported.default_guidance == 2.0
    labels = torch.tensor([1, 1, 8, 8])
    sampling = SamplingOptions(sample_steps=5)
    assert torch.equal(
        generate(exported, sampling, 4, 0, 4, labels), generate(original, sampling, 4, 0, 4, labels)
    )
