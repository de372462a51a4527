"""Random invalid command lines thrown at ddpm-train and ddpm-sample (hypothesis).

Each one must end in one line on stderr (``ddpm-<prog>: error: ...``), a non-zero exit status, no trace,
and nothing in the run directory but Hydra's own ``.hydra/``. The entry points run in this process,
exactly as the console scripts call them, so hundreds of command lines take seconds."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from conftest import TINY, assert_refused, compose, run_entry, write_random
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from ddpm import cli
from ddpm.diffusion.sampling import SAMPLERS
from ddpm.training.rundir.plan import flatten

FUZZ = settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)
# text that no typed key accepts: not a number, bool or null in any spelling
not_a_value = words.filter(
    lambda w: w.lower() not in {"true", "false", "null", "nan", "inf", "on", "off", "yes", "no"}
)
negative = st.integers(min_value=-(10**12), max_value=-1)
non_finite = st.sampled_from(["nan", "inf", "-inf"])


def below(low: int) -> st.SearchStrategy[str]:
    return st.integers(min_value=-(10**12), max_value=low - 1).map(str)


def floats_outside(low: float, high: float | None = None) -> st.SearchStrategy[str]:
    """Floats below ``low`` or at or above ``high``, and the non-finite ones."""
    parts = [
        st.floats(max_value=low, allow_nan=False, allow_infinity=False).filter(lambda v: v < low).map(repr),
        non_finite,
    ]
    if high is not None:
        parts.append(st.floats(min_value=high, allow_nan=False, allow_infinity=False).map(repr))
    return st.one_of(*parts)


def not_one_of(choices: set[str]) -> st.SearchStrategy[str]:
    return not_a_value.filter(lambda w: w not in choices)


# For every key of the composed train config, values that must be refused (with the default groups:
# linear schedule, unet model, digits data). test_every_train_key_is_fuzzed keeps this table complete.
TRAIN_INVALID: dict[str, st.SearchStrategy[str]] = {
    "sampler": not_one_of(set(SAMPLERS)),
    "sample_steps": st.one_of(below(1), not_a_value),  # at most T: larger is not an error
    "timestep_spacing": not_one_of({"linspace", "leading", "trailing"}),
    "eta": floats_outside(0),
    "ddpm_variance": not_one_of({"auto", "small", "large"}),  # learned: refused without learn_sigma
    "clip_x0": not_a_value,
    "schedule.name": not_one_of({"linear", "quadratic", "sigmoid", "cosine", "given"}),
    "schedule.zero_terminal_snr": not_a_value,  # (true is refused with eps-prediction: see below)
    "schedule.beta_start": st.one_of(floats_outside(0, 1), st.just("0.5")),  # 0.5 > beta_end
    "schedule.beta_end": floats_outside(1e-4, 1),
    "model.name": not_one_of({"unet", "ho2020"}),
    "model.dim": st.one_of(below(4), st.integers(2, 500).map(lambda k: str(2 * k + 1)), not_a_value),
    "model.dim_mults": st.one_of(
        st.just("[]"),
        st.lists(st.integers(-5, 0), min_size=1, max_size=3).map(
            lambda xs: "[" + ",".join(map(str, xs)) + "]"
        ),
        not_a_value,
    ),
    "model.dropout": floats_outside(0, 1),
    "model.resnet_block_groups": st.one_of(below(1), st.sampled_from(["3", "5", "7", "64"])),
    "model.attn_heads": below(1),
    "model.attn_dim_head": below(1),
    "data.name": not_one_of({"digits", "folder", "mnist", "fashion_mnist", "cifar10"}),
    "data.image_size": st.one_of(below(1), st.sampled_from(["9", "11", "31"])),  # the U-Net halves it
    "data.channels": st.integers(-10, 10).filter(lambda c: c not in (1, 3)).map(str),
    "data.hflip": not_a_value,
    "data.num_workers": below(0),
    "data.on_device": not_one_of({"auto"}),
    "data.on_device_max_mb": floats_outside(0),
    "ema.decay": floats_outside(0, 1),
    "ema.warmup": floats_outside(0),
    "loss": not_one_of({"l1", "l2", "huber", "kl"}),
    "objective": not_one_of({"eps", "x0", "v"}),
    "learn_sigma": not_a_value,
    "vlb_weight": floats_outside(0),
    "class_cond": not_a_value,
    "cond_drop_prob": floats_outside(0, 1),
    "guidance_scale": st.one_of(floats_outside(0), st.just("null")),  # null: none for ddpm-train
    "min_snr_gamma": floats_outside(0),
    "offset_noise": floats_outside(0),
    "timesteps": below(1),
    "batch_size": below(1),
    "grad_accum": st.one_of(below(1), st.sampled_from(["3", "5", "7", "256"])),  # must divide 16
    "steps": below(1),
    "lr": st.one_of(floats_outside(0), st.just("0")),
    "lr_warmup": below(0),
    "lr_decay": not_one_of({"none", "cosine"}),
    "grad_clip": floats_outside(0),
    "seed": not_a_value,
    "device": words.filter(lambda w: w not in ("auto", "cpu", "cuda")),
    "log_every": below(1),
    "sample_every": below(0),
    "checkpoint_every": below(0),
    "sample_n": below(1),
    "sample_batch_size": below(1),
    "dist_timeout": st.one_of(floats_outside(0), st.just("0")),
    "precision": not_one_of({"auto", "fp32", "bf16"}),
    "compile": not_a_value,
    "cuda_graph": st.one_of(not_a_value, st.just("true")),  # true: this CPU has no CUDA device
    "check_every": st.one_of(below(1), not_a_value),
    "forward_n": below(0),
    "keep_last": below(0),
    "on_nonfinite": not_one_of({"stop", "skip"}),
    "max_nonfinite": below(1),
    "logger": not_one_of({"none", "tensorboard"}),
    "resume": words.map(lambda w: f"no_such_dir/{w}.pt"),
    "init": words.map(lambda w: f"no_such_dir/{w}"),
    "eval_at_end": not_a_value,
    "eval_every": below(0),
    "eval.n": below(2),
    "eval.seed": not_a_value,
    "eval.sampler": not_one_of(set(SAMPLERS)),
    "eval.sample_steps": st.one_of(below(1), not_a_value),  # at most T: larger is not an error
    "eval.timestep_spacing": not_one_of({"linspace", "leading", "trailing"}),
    "eval.eta": floats_outside(0),
    "eval.ddpm_variance": not_one_of({"auto", "small", "large"}),
    "eval.clip_x0": not_a_value,
    "eval.guidance_scale": floats_outside(0),
    "eval.n_real": below(2),
    "eval.features": st.one_of(
        not_one_of({"classifier", "inception", "pixels"}).map(lambda w: f"[{w}]"), st.just("[]"), not_a_value
    ),
    "eval.inception_weights": words.map(lambda w: f"no_such_dir/{w}.pth"),
    "eval.classifier_steps": below(1),
    "eval.classifier_images": below(1),
    "eval.classifier_cache": st.just("/dev/null"),  # a file, not a folder
    "eval.kid_subsets": below(2),
    "eval.kid_subset_size": below(1),
    "eval.knn_k": below(1),
    "eval.nll": not_a_value,
    "eval.nll_split": not_one_of({"auto", "train", "test"}),
    "eval.nll_n": below(1),
}

# Whole overrides that are wrong in shape rather than in value.
BAD_SHAPES = st.one_of(
    words.filter(lambda w: w not in {"loss", "steps"}).map(lambda w: f"{w}_key=1"),  # no such key
    st.tuples(st.sampled_from(["schedule", "model", "data", "experiment"]), words).map(
        lambda gw: f"{gw[0]}=no_{gw[1]}"
    ),  # no such option in the group
    st.text(alphabet="=[]{}(),'\"\\ ${}:", min_size=1, max_size=8).map(lambda junk: f"loss{junk}"),
    st.sampled_from(["=1", "steps=", "steps=[1,", "model.dim_mults=[1,2", "loss=${oc.env:NO_SUCH_VAR}"]),
)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def train_refuses(args: list[str], root: Path, capsys, base: list[str] = TINY) -> None:
    run = root / f"run_{uuid.uuid4().hex[:8]}"
    code, lines, output = run_entry(cli.train_main, [*base, "steps=1", *args, f"hydra.run.dir={run}"], capsys)
    assert_refused("ddpm-train", code, lines, output, args)
    made = [p.relative_to(run).parts[0] for p in run.rglob("*")] if run.exists() else []
    assert set(made) <= {".hydra"}, (args, made)


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_random_invalid_train_overrides_are_refused(data, fuzz_dir, capsys):
    key = data.draw(st.sampled_from(sorted(TRAIN_INVALID)))
    value = data.draw(TRAIN_INVALID[key])
    valid = data.draw(
        st.lists(st.sampled_from(["loss=l1", "timesteps=50", "lr=3e-4", "seed=3"]), unique=True)
    )
    train_refuses([*valid, f"{key}={value}"], fuzz_dir, capsys)


@pytest.mark.slow
@FUZZ
@given(override=BAD_SHAPES)
def test_random_malformed_train_overrides_are_refused(override, fuzz_dir, capsys):
    train_refuses([override], fuzz_dir, capsys)


def test_every_train_key_is_fuzzed(compose_cfg):
    keys = set(flatten(OmegaConf.to_container(compose_cfg("train"), enum_to_str=True)))
    assert keys == set(TRAIN_INVALID), keys ^ set(TRAIN_INVALID)


# The keys that only some group options have, each with a valid base to go wrong from. A tiny base, so
# that a value let through by mistake trains one quick step (and fails the test) rather than a big model.
HO_TINY = [
    "model=ho2020",
    "model.dim=32",
    "model.dim_mults=[1,2]",
    "model.num_res_blocks=1",
    "model.attn_resolutions=[4]",
    "batch_size=16",
    "sample_n=4",
    "device=cpu",
    "timesteps=20",
]
GROUP_INVALID: dict[str, tuple[list[str], dict[str, st.SearchStrategy[str]]]] = {
    "schedule=sigmoid": (
        ["schedule=sigmoid"],
        {
            "schedule.start": st.one_of(non_finite, st.just("7.0")),  # start must be below end = 6
            "schedule.end": st.one_of(non_finite, st.just("-7.0")),
        },
    ),
    "schedule=cosine": (
        ["schedule=cosine"],
        {
            "schedule.s": floats_outside(0),
            "schedule.max_beta": st.one_of(floats_outside(0, 1), st.just("0")),
        },
    ),
    "model=ho2020": (
        [],
        {
            "model.num_res_blocks": below(1),
            "model.attn_resolutions": st.one_of(st.sampled_from(["[3]", "[16]", "[8,5]"]), not_a_value),
            "model.dim": st.integers(1, 200).map(lambda k: str(2 * k)).filter(lambda d: int(d) % 32 != 0),
            "model.variant": not_one_of({"original", "legacy"}),
        },
    ),
    "schedule=given": (
        ["schedule=given", "timesteps=4", "schedule.betas=[0.1,0.2,0.3,0.4]"],
        {  # betas outside (0, 1), none, or not one per step
            "schedule.betas": st.one_of(
                st.sampled_from(
                    ["[]", "[0.1,0.2,0.3,1.5]", "[0,0.1,0.2,0.3]", "[0.1,0.2]", "[0.1,0.2,0.3,0.4,0.5]"]
                ),
                not_a_value,
            ),
        },
    ),
    "data=folder": (
        [],
        {  # base: a folder of images, made by the test
            "data.root": words.map(lambda w: f"no_such_dir/{w}"),
            "data.bad_images": not_one_of({"skip", "error"}),
            "data.background": st.one_of(below(0), st.integers(256, 10**9).map(str), not_a_value),
        },
    ),
    "data=mnist": (
        ["data=mnist", "data.download=false"],
        {
            "data.root": words.map(lambda w: f"no_such_dir/{w}"),  # and no download: the files are not there
            "data.download": not_a_value,
        },
    ),
}


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_random_invalid_group_keys_are_refused(data, fuzz_dir, capsys):
    option = data.draw(st.sampled_from(sorted(GROUP_INVALID)))
    args, keys = GROUP_INVALID[option]
    key = data.draw(st.sampled_from(sorted(keys)))
    base = HO_TINY if option == "model=ho2020" else TINY
    if option == "data=folder":
        args = folder_args(fuzz_dir)
    train_refuses([*args, f"{key}={data.draw(keys[key])}"], fuzz_dir, capsys, base=base)


def folder_args(root: Path) -> list[str]:
    pics = root / "pics"
    if not pics.exists():
        pics.mkdir()
        for i in range(20):
            write_random(pics / f"{i}.png", seed=i)
    return ["data=folder", f"data.root={pics}", "data.image_size=8", "data.channels=1"]


@pytest.mark.parametrize(
    "option",
    [
        "schedule=quadratic",
        "schedule=sigmoid",
        "schedule=cosine",
        "schedule=given",
        "model=ho2020",
        "data=folder",
        "data=mnist",
        "data=fashion_mnist",
        "data=cifar10",
    ],
)
def test_every_group_key_is_fuzzed(compose_cfg, option):
    default = set(flatten(OmegaConf.to_container(compose_cfg("train"), enum_to_str=True)))
    extra = ["schedule.betas=[0.1]"] if option == "schedule=given" else []
    keys = set(flatten(OmegaConf.to_container(compose_cfg("train", [option, *extra]), enum_to_str=True)))
    family = {"data=fashion_mnist": "data=mnist", "data=cifar10": "data=mnist"}.get(option, option)
    fuzzed = set(GROUP_INVALID.get(family, ([], {}))[1])
    assert keys - default <= fuzzed, (keys - default) - fuzzed


def test_zero_terminal_snr_with_eps_is_refused(fuzz_dir, capsys):
    train_refuses(["schedule.zero_terminal_snr=true"], fuzz_dir, capsys)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    from ddpm.training.loop import train

    run = tmp_path_factory.mktemp("ckpt")
    train(compose("train", [*TINY, "steps=1", "timesteps=20", "forward_n=0"]), run)
    return run / "checkpoints/last.pt"


SAMPLE_INVALID: dict[str, st.SearchStrategy[str]] = {
    "sampler": not_one_of(set(SAMPLERS)),
    "sample_steps": st.one_of(below(1), not_a_value),  # at most T: larger is not an error
    "timestep_spacing": not_one_of({"linspace", "leading", "trailing"}),
    "eta": floats_outside(0),
    "ddpm_variance": not_one_of({"auto", "small", "large"}),  # learned: the fuzzed checkpoint's are fixed
    "clip_x0": not_a_value,
    # the checkpoint is unconditional: any labels and any guidance scale are refused
    "guidance_scale": st.one_of(floats_outside(0), st.floats(0, 10, allow_nan=False).map(repr)),
    "labels": st.one_of(st.integers(-5, 20).map(str), not_a_value, st.just("[0,1]")),
    "ckpt": words.map(lambda w: f"no_such_dir/{w}.pt"),
    "ema": not_a_value,
    "n": below(1),
    "seed": not_a_value,
    "out": st.just("/dev/null/out"),
    "batch_size": below(1),
    "device": words.filter(lambda w: w not in ("auto", "cpu", "cuda")),
    "save_images": not_a_value,
    "gif": not_a_value,
    "gif_frames": below(2),
    "gif_frame_ms": below(10),
}


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_random_invalid_sample_overrides_are_refused(data, tiny_ckpt, fuzz_dir, capsys):
    key = data.draw(st.sampled_from(sorted(SAMPLE_INVALID)))
    value = data.draw(SAMPLE_INVALID[key])
    out = fuzz_dir / f"out_{uuid.uuid4().hex[:8]}"
    args = [f"ckpt={tiny_ckpt}", "n=2", f"out={out}", f"{key}={value}"]  # the last value of a key wins
    code, lines, output = run_entry(cli.sample_main, args, capsys)
    assert_refused("ddpm-sample", code, lines, output, args)
    assert not out.exists(), args


def test_every_sample_key_is_fuzzed(compose_cfg):
    keys = set(flatten(OmegaConf.to_container(compose_cfg("sample"), enum_to_str=True)))
    assert keys == set(SAMPLE_INVALID), keys ^ set(SAMPLE_INVALID)
