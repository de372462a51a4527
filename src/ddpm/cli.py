"""Console entry points ``ddpm-train``, ``ddpm-sample``, ``ddpm-eval`` and ``ddpm-export``: Hydra parses the
command line, the library does the work, and a bad input ends in one line on stderr (the full trace with
HYDRA_FULL_ERROR=1)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobStatus
from hydra.errors import HydraException, MissingConfigException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, read_write
from omegaconf.errors import OmegaConfBaseException

from ddpm.config import register_configs
from ddpm.errors import ConfigError, DdpmError
from ddpm.evaluation.evaluate import evaluate, summary_lines, written_line
from ddpm.evaluation.tradeoff import write_sweep
from ddpm.export import export
from ddpm.runtime import launched_ranks
from ddpm.sample import sample
from ddpm.summary import write_summary
from ddpm.sweeps import (
    SUBMITIT_LAUNCHERS,
    prepare_classifiers,
    require_launcher_plugin,
    sweep_job_configs,
)
from ddpm.training.loop import train
from ddpm.training.rundir.bookkeeping import holds_run
from ddpm.training.rundir.plan import override_keys, plan_run
from ddpm.training.stopping import TrainingStopped

CONFIGS = "pkg://ddpm.configs"
TRACE_VARIABLE = "HYDRA_FULL_ERROR"  # =1: the full trace instead of one line
# What the user asked for: run() sets the variable itself while Hydra runs, so it is read before that.
_user_wants_trace: ContextVar[bool | None] = ContextVar("user_wants_trace", default=None)
register_configs()


def user_wants_trace() -> bool:
    asked = _user_wants_trace.get()
    return asked if asked is not None else os.environ.get(TRACE_VARIABLE) == "1"


@hydra.main(version_base="1.3", config_path=CONFIGS, config_name="train")
def _train(cfg: DictConfig) -> None:
    with one_line_errors("ddpm-train"):
        require(cfg)
        hydra_cfg = HydraConfig.get()
        sweep_job = hydra_cfg.job.num if hydra_cfg.mode == RunMode.MULTIRUN else None
        train(cfg, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task), sweep_job)


@hydra.main(version_base="1.3", config_path=CONFIGS, config_name="sample")
def _sample(cfg: DictConfig) -> None:
    with one_line_errors("ddpm-sample"):
        require(cfg)
        sample(cfg)


@hydra.main(version_base="1.3", config_path=CONFIGS, config_name="eval")
def _eval(cfg: DictConfig) -> dict[str, Any]:
    with one_line_errors("ddpm-eval"):
        require(cfg)
        report = evaluate(cfg, shape_from_ckpt=shape_left_out())
        for line in summary_lines(report):
            print(f"ddpm-eval: {line}")
        print(f"ddpm-eval: {written_line(report)}")
        return report


def shape_left_out() -> list[str]:
    """The data shape keys (image_size, channels) this command line does not set: a ckpt's folder of real
    images takes them from the checkpoint."""
    given = {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}
    return [key for key in ("image_size", "channels") if f"data.{key}" not in given]


class EvalSweep(Callback):
    """A ``ddpm-eval -m`` sweep ends in one table of its jobs (sweep.csv, sweep.md in hydra.sweep.dir) and,
    for a conditional model swept over guidance_scale, the FID-against-accuracy plot (guidance.png)."""

    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.reports = []

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if job_return.status == JobStatus.COMPLETED and isinstance(job_return.return_value, dict):
            self.reports.append(job_return.return_value)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        with one_line_errors("ddpm-eval"):
            if not self.reports:
                return
            sweep = Path(config.hydra.sweep.dir)
            sweep.mkdir(parents=True, exist_ok=True)
            written = write_sweep(sweep, self.reports)
            print(f"ddpm-eval: sweep of {len(self.reports)} jobs -> {', '.join(str(p) for p in written)}")


class RunDirGuard(Callback):
    """Runs before Hydra writes its .hydra/ record into the run directory (configs/train.yaml names it).

    A new run never lands in a directory that holds one; resume=PATH continues in the checkpoint's own
    run directory unless hydra.run.dir says otherwise; a resumed run's record goes to .hydra/resumed_*,
    beside the original's. Hydra turns a callback's exception into a warning, so errors leave as exits."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        with one_line_errors("ddpm-train"):
            given = "hydra.run.dir" in override_keys(config.hydra.overrides.hydra)
            rank, _, world = launched_ranks()
            if world > 1 and not given:
                # each rank would resolve ${now:...} on its own clock: one run directory per rank
                raise ConfigError(
                    f"hydra.run.dir is required under torchrun (WORLD_SIZE={world}): every rank must write "
                    "into one run directory, e.g. hydra.run.dir=runs/ddp resume=auto"
                )
            plan = plan_run(config, Path(config.hydra.run.dir), config.hydra.overrides.task, given)
            with read_write(config.hydra):
                config.hydra.run.dir = str(plan.run_dir)
                if rank != 0:
                    config.hydra.output_subdir = None  # the main rank keeps Hydra's record
                elif plan.continues_in_place:
                    config.hydra.output_subdir = f".hydra/resumed_{time.strftime('%Y-%m-%d_%H-%M-%S')}"

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """The sweep's answer: summary.csv, summary.md and summary.png in the sweep folder."""
        with one_line_errors("ddpm-train"):
            sweep = Path(config.hydra.sweep.dir)
            for note in write_summary(sweep):
                print(f"ddpm-train: note: {note}")
            print(f"ddpm-train: sweep summary -> {sweep / 'summary.md'} (and summary.csv, summary.png)")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with one_line_errors("ddpm-train"):
            if launched_ranks()[2] > 1:
                raise ConfigError(
                    "-m is refused under torchrun: every rank would run the whole sweep; run each job "
                    "with torchrun, or sweep with a launcher (hydra/launcher=...)"
                )
            resume = config.get("resume")
            if resume not in (None, "auto"):
                raise ConfigError(
                    f"resume={resume} continues one run; a sweep continues with resume=auto and the same "
                    "hydra.sweep.dir"
                )
            # submitit's launchers requeue a job on SIGUSR2 (pre-empted, or at its time limit up to
            # max_num_timeout times); the requeued job finds its folder holding a run, which only
            # resume=auto continues
            target = str(config.hydra.launcher.get("_target_", ""))
            if target.startswith(SUBMITIT_LAUNCHERS) and resume is None:
                launcher = config.hydra.runtime.choices.get("hydra/launcher")
                raise ConfigError(
                    f"hydra/launcher={launcher} requeues a job that is pre-empted or reaches its time limit, "
                    "and a requeued job continues only with resume=auto: add resume=auto"
                )
            sweep = Path(config.hydra.sweep.dir)
            if resume is None and sweep.is_dir() and any(holds_run(d) for d in sweep.iterdir()):
                raise ConfigError(
                    f"hydra.sweep.dir={sweep} already holds runs: continue them with resume=auto, "
                    "or choose another hydra.sweep.dir"
                )
            # the jobs may run at once (joblib, Slurm): each must find its classifier cached, not train it
            for cache in prepare_classifiers(sweep_job_configs(config)):
                print(f"ddpm-train: eval classifier ready: {cache}")


@hydra.main(version_base="1.3", config_path=CONFIGS, config_name="export")
def _export(cfg: DictConfig) -> None:
    with one_line_errors("ddpm-export"):
        require(cfg)
        export(cfg)


def require(cfg: DictConfig) -> None:
    """Name the first mandatory key (``???`` in the YAML) the user left unset."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]} is required: add {missing[0]}=... to the command line")


def one_line(e: BaseException) -> str:
    """The message of a config error on one line, without OmegaConf's full_key/object_type trailer."""
    if isinstance(e, MissingConfigException) and e.options and e.missing_cfg_file:
        group, _, value = e.missing_cfg_file.rpartition("/")
        return f"{group}={value} is invalid: choose one of {', '.join(sorted(e.options))}"
    trailer = ("full_key:", "object_type=", "reference_type=", "Set the environment variable")
    lines = [ln.strip() for ln in str(e).splitlines()]
    text = " ".join(ln for ln in lines if ln and not ln.startswith(trailer))
    if isinstance(e, HydraException) and isinstance(e.__cause__, OmegaConfBaseException):
        text = f"{text.rstrip('.')}: {one_line(e.__cause__)}"
    return text


@contextmanager
def one_line_errors(prog: str) -> Iterator[None]:
    """Turn a config error into one line on stderr and exit status 2 (a trace with HYDRA_FULL_ERROR=1).

    Used around Hydra's composition and inside each job: a SystemExit passes through Hydra untouched,
    where an exception would be reported again with the job's overrides."""
    wants_trace = user_wants_trace()
    rank, _, world = launched_ranks()
    if world > 1:  # torchrun's own report of a failed rank follows; this line says which and why first
        prog = f"{prog} (rank {rank} of {world})"
    try:
        yield
    except (DdpmError, HydraException, OmegaConfBaseException) as e:
        if wants_trace:
            raise
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as e:
        print(e.line(prog), file=sys.stderr)
        if e.pass_notice_on is not None:
            e.pass_notice_on()  # submitit's handler requeues the job and exits; another may return
        sys.exit(e.exit_code)
    except (ValueError, TypeError) as e:
        # Hydra's parser raises plain ValueErrors on some malformed overrides ("=1"); ours are bugs.
        if wants_trace or not _raised_by_hydra(e):
            raise
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)


def _raised_by_hydra(e: BaseException) -> bool:
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = Path(tb.tb_frame.f_code.co_filename).parts if tb is not None else ()
    return "hydra" in where or "omegaconf" in where


def run(task: Callable[[], None], prog: str) -> None:
    before = os.environ.get(TRACE_VARIABLE)
    asked = _user_wants_trace.set(before == "1")
    os.environ[TRACE_VARIABLE] = "1"  # let composition errors reach us, not Hydra's multi-line report
    try:
        with one_line_errors(prog):
            require_launcher_plugin(sys.argv[1:])
            task()
    finally:
        if before is None:
            os.environ.pop(TRACE_VARIABLE, None)
        else:
            os.environ[TRACE_VARIABLE] = before
        _user_wants_trace.reset(asked)


def train_main() -> None:
    run(_train, "ddpm-train")


def sample_main() -> None:
    run(_sample, "ddpm-sample")


def eval_main() -> None:
    run(_eval, "ddpm-eval")


def export_main() -> None:
    run(_export, "ddpm-export")


def summary_main() -> None:
    """ddpm-summary DIR: summary.csv, summary.md and summary.png for a sweep folder or any folder of runs."""
    import argparse

    parser = argparse.ArgumentParser(prog="ddpm-summary", description=summary_main.__doc__)
    parser.add_argument("folder", type=Path, help="a sweep folder (hydra.sweep.dir), or any folder of runs")
    folder = parser.parse_args().folder
    with one_line_errors("ddpm-summary"):
        if not folder.is_dir():
            raise ConfigError(f"{folder} is not a folder: give a sweep folder or a folder of runs")
        for note in write_summary(folder):
            print(f"ddpm-summary: note: {note}")
        print(f"ddpm-summary: {folder / 'summary.md'} (and summary.csv, summary.png)")
