"""Sweeps on Hydra's launcher plugins: the job ddpm's Slurm preset asks for, a Slurm job that reaches its
time limit and is requeued (Slurm mocked by submitit's own test helpers, the jobs run in this process),
a real parallel sweep through joblib, the GPU each parallel job takes, and the refusals."""

import csv
import datetime
import json
import signal

import hydra.core.utils
import pytest
import torch
import yaml
from conftest import TINY, assert_refused, cheap_eval, run_entry, signal_at
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from submitit.core import job_environment, submission, utils
from submitit.slurm import slurm
from submitit.slurm.test_slurm import mocked_slurm

from ddpm import cli, sweeps
from ddpm.checkpoint import load_checkpoint
from ddpm.runtime import Runtime, resolve_device

QUICK = [*TINY, "timesteps=20", "sample_every=0", "checkpoint_every=0", "forward_n=0"]


def composed_with_hydra(overrides: list[str]):
    with initialize_config_module(config_module="ddpm.configs", version_base="1.3"):
        return compose("train", overrides, return_hydra_config=True)


@pytest.fixture
def submitit_signals():
    """submitit's job side installs its own handlers (SIGUSR2: requeue); give this process its own back."""
    kept = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGCONT, signal.SIGUSR2)}
    yield
    for s, handler in kept.items():
        signal.signal(s, handler)


def test_the_slurm_preset_asks_for_one_task_one_gpu_and_a_notice_before_the_time_limit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = composed_with_hydra(["hydra/launcher=slurm", "hydra.sweep.dir=sweep"])
    # what the plugin does with it: instantiate the launcher, submit the jobs as one array
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=lambda c: None, config=cfg)
    with mocked_slurm():
        monkeypatch.setattr(slurm.SlurmJob, "results", lambda job: [job.job_id])  # no cluster to wait for
        jobs = launcher.launch([["loss=l1"], ["loss=l2"]], initial_job_idx=0)
    assert jobs == ["12_0", "12_1"]
    sbatch = (tmp_path / "sweep/.submitit/12/12_submission.sh").read_text().splitlines()
    for line in [
        "#SBATCH --array=0-1%2",  # one job array, every job at once
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",  # one ddpm-train process per job ...
        "#SBATCH --gpus-per-node=1",  # ... on one GPU
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --mem=16GB",
        "#SBATCH --time=240",
        "#SBATCH --signal=USR2@120",  # the notice that ddpm checkpoints on and submitit requeues on
        "#SBATCH --requeue",
    ]:
        assert line in sbatch
    # a job that reaches its time limit is requeued up to max_num_timeout=3 times
    submitted = utils.DelayedSubmission.load(tmp_path / "sweep/.submitit/12_0/12_0_submitted.pkl")
    assert submitted._timeout_countdown == 3


def test_a_slurm_job_at_its_time_limit_checkpoints_is_requeued_and_continues_in_its_folder(
    tmp_path, monkeypatch, capsys, submitit_signals
):
    """ddpm-train -m hydra/launcher=slurm resume=auto: SIGUSR2 at step 3 of 6 (Slurm's notice), a
    checkpoint at step 3, submitit's requeue, and the requeued job, started an hour later, continues from
    step 3 in the same folder (the sweep folder's ${now:} was resolved once, when the sweep was submitted)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SUBMITIT_FOLDER", raising=False)  # process_job sets it
    signal_at(monkeypatch, 3, signal.SIGUSR2)
    requeued: list[int] = []
    monkeypatch.setattr(
        slurm.SlurmJobEnvironment, "_requeue", lambda env, countdown: requeued.append(countdown)
    )
    monkeypatch.setattr(job_environment.SignalHandler, "has_timed_out", lambda handler: True)
    real_results = slurm.SlurmJob.results

    def cluster_runs(job):
        """What Slurm does with the job: run it, stop it at its time limit, run it again when requeued."""
        with mock.job_context(job.job_id), pytest.raises(SystemExit):
            submission.process_job(job.paths.folder)  # submitit's handler exits after requeueing
        assert requeued == [2]  # one of max_num_timeout=3 requeues used
        later = datetime.datetime.now() + datetime.timedelta(hours=1)
        monkeypatch.setattr(
            hydra.core.utils, "datetime", type("Later", (), {"now": staticmethod(lambda: later)})
        )
        with mock.job_context(job.job_id):
            submission.process_job(job.paths.folder)
        return real_results(job)

    monkeypatch.setattr(slurm.SlurmJob, "results", cluster_runs)
    with mocked_slurm() as mock:
        args = [
            "-m",
            "hydra/launcher=slurm",
            "resume=auto",
            "loss=l1",
            *QUICK,
            "steps=6",
            "eval_at_end=false",
        ]
        code, lines, output = run_entry(cli.train_main, args, capsys)
    assert code == 0, output
    (sweep,) = (tmp_path / "runs/multirun").iterdir()
    (run,) = (d for d in sweep.iterdir() if d.is_dir() and not d.name.startswith("."))
    assert "stopped by SIGUSR2 at step 3 of 6; checkpoint" in output
    assert "SIGUSR2 goes on to the handler it had before" in output
    assert f"resuming from {run / 'checkpoints/last.pt'} at step 3 of 6" in output
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert load_checkpoint(run / "checkpoints/step_000003.pt")["step"] == 3
    assert load_checkpoint(run / "checkpoints/last.pt")["step"] == 6
    assert (sweep / "summary.csv").is_file()


def test_the_notice_reaches_the_previous_handler_after_the_checkpoint_and_the_message(
    tmp_path, monkeypatch, capsys
):
    """ddpm-train under any launcher that had SIGUSR2 before ddpm: the step's checkpoint and the message
    come first, then that handler; where it returns, the exit status is 128 + SIGUSR2."""
    monkeypatch.chdir(tmp_path)
    calls = []

    def launchers_handler(signum, frame):
        calls.append((signum, load_checkpoint(tmp_path / "run/checkpoints/last.pt")["step"]))
        calls.append(capsys.readouterr().err)

    signal_at(monkeypatch, 2, signal.SIGUSR2)
    original = signal.signal(signal.SIGUSR2, launchers_handler)
    try:
        code, _, _ = run_entry(cli.train_main, [*QUICK, "steps=5", "hydra.run.dir=run"], capsys)
    finally:
        signal.signal(signal.SIGUSR2, original)
    assert code == 128 + signal.SIGUSR2
    assert calls[0] == (signal.SIGUSR2, 2)
    assert "ddpm-train: stopped by SIGUSR2 at step 2 of 5" in calls[1]
    assert "SIGUSR2 goes on to the handler it had before" in calls[1]


@pytest.mark.slow
def test_a_parallel_sweep_runs_its_jobs_side_by_side_and_ends_in_a_summary(tmp_path, cli):
    result = cli(
        "ddpm-train",
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "loss=l1,l2",
        *QUICK,
        "steps=2",
        *cheap_eval(tmp_path / "cache"),
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    # the jobs, side by side, score with the one classifier trained before they started
    assert result.stdout.count("eval classifier ready: ") == 1
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(jobs) == 2
    for i, (job, loss) in enumerate(zip(jobs, ["l1", "l2"], strict=True)):
        assert job.name.startswith(f"{i}_") and f"loss={loss}" in job.name
        assert load_checkpoint(job / "checkpoints/last.pt")["step"] == 2
        assert yaml.safe_load((job / ".hydra/config.yaml").read_text())["loss"] == loss
    rows = list(csv.DictReader((tmp_path / "sweep/summary.csv").open()))
    assert len(rows) == 2 and all(float(r["fid"]) > 0 for r in rows) and "sweep summary ->" in result.stdout


@pytest.mark.parametrize(
    ("gpus", "device", "job", "expected"),
    [
        (4, "auto", 5, "cuda:1"),  # a parallel sweep's job 5 on 4 GPUs
        (4, "auto", 0, "cuda:0"),
        (1, "auto", 5, "cuda"),  # one GPU: every job shares it
        (4, "auto", None, "cuda"),  # not a sweep job
        (4, "cuda:2", 5, "cuda:2"),  # asked for
        (4, "cuda", 5, "cuda"),
        (0, "auto", 5, "cpu"),
    ],
)
def test_a_sweep_job_takes_the_gpu_of_its_number(monkeypatch, gpus, device, job, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert resolve_device(device, job) == torch.device(expected)


def test_torchrun_ranks_keep_their_local_rank_in_a_sweep_job(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)  # precision=auto asks the GPU
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert Runtime.for_training(composed_with_hydra(["device=auto"]), sweep_job=2).device == torch.device(
        "cuda:1"
    )


@pytest.mark.parametrize(
    ("launcher", "message"),
    [
        (
            "slurm",
            "hydra/launcher=slurm needs the hydra-submitit-launcher plugin: "
            "pip install -e '.[slurm]' in the ddpm checkout",
        ),
        ("submitit_slurm", "hydra/launcher=submitit_slurm needs the hydra-submitit-launcher plugin"),
        ("submitit_local", "hydra/launcher=submitit_local needs the hydra-submitit-launcher plugin"),
        (
            "parallel",
            "hydra/launcher=parallel needs the hydra-joblib-launcher plugin: "
            "pip install -e '.[joblib]' in the ddpm checkout",
        ),
        ("joblib", "hydra/launcher=joblib needs the hydra-joblib-launcher plugin"),
    ],
)
def test_a_launcher_without_its_plugin_is_one_line_and_writes_nothing(
    tmp_path, monkeypatch, capsys, launcher, message
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweeps, "find_spec", lambda name: None)  # as if no plugin were installed
    args = ["-m", f"hydra/launcher={launcher}", "loss=l1,l2", *QUICK, "steps=1", "hydra.sweep.dir=sweep"]
    code, lines, output = run_entry(cli.train_main, args, capsys)
    assert_refused("ddpm-train", code, lines, output, args)
    assert code == 2 and message in lines[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("launcher", ["slurm", "submitit_slurm", "submitit_local"])
def test_a_requeueing_launcher_needs_resume_auto(tmp_path, monkeypatch, capsys, launcher):
    monkeypatch.chdir(tmp_path)
    args = ["-m", f"hydra/launcher={launcher}", "loss=l1,l2", *QUICK, "steps=1", "hydra.sweep.dir=sweep"]
    code, lines, output = run_entry(cli.train_main, args, capsys)
    assert_refused("ddpm-train", code, lines, output, args)
    assert code == 2 and f"hydra/launcher={launcher} requeues a job that is pre-empted" in lines[0]
    assert lines[0].endswith("continues only with resume=auto: add resume=auto")
    assert not (tmp_path / "sweep").exists()
