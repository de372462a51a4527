"""The key lists a resumed run checks and a sweep names its folders by come from the schema's marks."""

import shutil
from dataclasses import dataclass

import pytest
from conftest import FIXTURES, TINY
from hydra import compose, initialize_config_module
from omegaconf import MISSING

from ddpm.config import resumable_train_keys, train_keys, unnamed_train_keys
from ddpm.errors import ConfigError
from ddpm.keys import described, leaves, resumable
from ddpm.training.rundir.plan import flatten, plain_config, plan_run


@dataclass
class Inner:
    a: int = MISSING
    b: int = resumable()


@dataclass
class OptionOne:
    name: str = MISSING
    x: int = resumable(named=False)


@dataclass
class OptionTwo:
    name: str = MISSING
    y: int = resumable()


@dataclass
class Outer:
    fixed: int = MISSING
    inner: Inner = resumable(named=False)
    named_inner: Inner = MISSING
    group: OptionOne = MISSING


def test_marks_hold_for_every_key_below_and_the_stricter_one_wins():
    got = {key: (r, n) for key, r, n in leaves(Outer, {"group": [OptionOne, OptionTwo]})}
    assert got == {
        "fixed": (False, True),
        "inner.a": (True, False),  # resumable and unnamed from the field above
        "inner.b": (True, False),  # named by its own mark, unnamed from above: unnamed
        "named_inner.a": (False, True),
        "named_inner.b": (True, True),
        "group.name": (False, True),
        "group.x": (True, False),  # a group's keys are those of all its options
        "group.y": (True, True),
    }


def test_options_of_a_group_must_agree_on_a_shared_key():
    @dataclass
    class Clash:
        name: str = resumable()

    with pytest.raises(TypeError, match="group.name is marked differently"):
        list(leaves(Outer, {"group": [OptionOne, Clash]}))


def test_a_whole_group_of_keys_is_described_as_one():
    every = ["a", "e.x", "e.y", "d.x", "d.y"]
    assert described(["a", "e.x", "e.y", "d.x"], every) == "a, e.*, d.x"


def composed_with_hydra(overrides):
    with initialize_config_module(config_module="ddpm.configs", version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("group", ["data=folder", "data=cifar10", "model=ho2020", "schedule=cosine"])
def test_the_derived_keys_are_the_composed_configs_keys(group):
    cfg = composed_with_hydra([group])
    composed = set(flatten(plain_config(cfg)))
    marked = {key for key, *_ in train_keys()}
    # every key of the composed config has its marks; every mark outside the groups (whose keys are those
    # of all their options) names one of its keys
    assert composed <= marked
    assert {k for k in marked if k.split(".")[0] not in ("schedule", "model", "data")} <= composed


def test_hydra_leaves_the_unnamed_keys_out_of_the_sweep_folder_names():
    cfg = composed_with_hydra([])
    excluded = list(cfg.hydra.job.config.override_dirname.exclude_keys)
    assert excluded == unnamed_train_keys()
    assert {"steps", "log_every", "resume", "eval.n", "data.num_workers"} <= set(excluded)
    assert not {"loss", "lr", "sampler", "precision", "data.root"} & set(excluded)


def test_unnamed_keys_are_resumable_and_fixed_keys_are_named():
    resumable_keys = set(resumable_train_keys())
    for key, resumes, named in train_keys():
        assert resumes or named, key  # a key that changes the weights must show in a folder name
    assert set(unnamed_train_keys()) <= resumable_keys
    assert {"steps", "sampler", "precision", "data.root", "eval.n"} <= resumable_keys
    assert not {"loss", "lr", "timesteps", "model.dim", "data.image_size", "ema.decay"} & resumable_keys


@pytest.mark.parametrize(("key", "value", "allowed"), [("sample_n", 2, True), ("lr", 0.5, False)])
def test_a_resumed_run_changes_the_resumable_keys_only(tmp_path, key, value, allowed):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copyfile(FIXTURES / "tiny_v2.pt", run / "checkpoints/last.pt")
    asked = [*TINY, "resume=auto", f"{key}={value}"]
    cfg = composed_with_hydra(asked)
    if allowed:
        assert plan_run(cfg, run, asked).config[key] == value
    else:
        with pytest.raises(
            ConfigError, match=rf"{key}={value} differs .*may change sampler, .*eval\.\*, steps"
        ):
            plan_run(cfg, run, asked)
