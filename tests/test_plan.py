"""plan_run: the one place that decides the run directory, the checkpoint a run continues from and the
config it continues with (the Hydra callback and train() both ask it)."""

import shlex
import shutil

import pytest
from conftest import FIXTURES, TINY, compose
from hydra.core.override_parser.overrides_parser import OverridesParser

from ddpm.errors import CheckpointError, ConfigError
from ddpm.training.rundir.plan import override_keys, plan_run, shell_override

SAVED = FIXTURES / "tiny_v2.pt"  # step 4 of a tiny run, T=20


def test_override_keys_come_from_hydras_parser():
    keys = override_keys(["+model.dim=8", "~ema.warmup", "loss=l1", "experiment=ddpm_cifar10", "a.b=[1,2]"])
    assert keys == ["model.dim", "ema.warmup", "loss", "experiment", "a.b"]


def test_a_new_run_goes_where_it_is_told_and_only_into_an_empty_directory(tmp_path):
    plan = plan_run(compose("train", TINY), tmp_path / "run")
    assert plan.run_dir == tmp_path / "run" and plan.checkpoint is None and not plan.continues_in_place
    (tmp_path / "run").mkdir()
    (tmp_path / "run/metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match="already holds a run"):
        plan_run(compose("train", TINY), tmp_path / "run")


def test_resume_path_continues_in_the_checkpoints_run_unless_a_directory_is_given(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copyfile(SAVED, run / "checkpoints/step_000004.pt")
    overrides = [*TINY, f"resume={run / 'checkpoints/step_000004.pt'}", "steps=6"]
    cfg = compose("train", overrides)
    plan = plan_run(cfg, tmp_path / "elsewhere", overrides, run_dir_given=False)
    assert plan.run_dir == run and plan.continues_in_place
    assert plan.config.steps == 6 and plan.config.timesteps == 20  # the saved T, the asked-for steps
    fork = plan_run(cfg, tmp_path / "new", overrides, run_dir_given=True)
    assert fork.run_dir == tmp_path / "new" and fork.fork and not fork.continues_in_place


def test_resume_auto_without_a_checkpoint_starts_the_run(tmp_path):
    plan = plan_run(compose("train", [*TINY, "resume=auto"]), tmp_path)
    assert plan.checkpoint is None and plan.saved is None


def test_a_resumed_run_keeps_what_its_weights_were_trained_with(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copyfile(SAVED, run / "checkpoints/last.pt")
    asked = [*TINY, "resume=auto", "loss=l1"]
    with pytest.raises(ConfigError, match="loss=l1 differs from the resumed run's loss=huber"):
        plan_run(compose("train", asked), run, asked)


def test_an_export_is_not_a_resume_point(tmp_path):
    export = FIXTURES / "tiny_v2.safetensors"
    with pytest.raises(ConfigError, match="holds weights only"):
        plan_run(compose("train", [*TINY, f"resume={export}"]), tmp_path)
    bare = tmp_path / "bare.pt"
    from ddpm.checkpoint import save_checkpoint

    save_checkpoint(bare, step=1, model={}, config={})
    with pytest.raises(CheckpointError, match="holds weights only"):
        plan_run(compose("train", [*TINY, f"resume={bare}"]), tmp_path / "x")


@pytest.mark.parametrize(
    "value",
    [
        "runs/plain-run_1.5",
        "/tmp/sweep/0_loss=l1,lr=0.001",  # a sweep job's folder
        "runs/it's here",
        'runs/a "quoted" $HOME\\x',
        "~/runs/x+y@z",
        "",
    ],
)
def test_a_suggested_override_reaches_hydra_as_the_value_it_names(value):
    argument = shell_override("hydra.run.dir", value)
    (typed,) = shlex.split(argument)  # what the shell hands on
    (parsed,) = OverridesParser.create().parse_overrides([typed])
    assert parsed.key_or_group == "hydra.run.dir" and str(parsed.value()) == value
