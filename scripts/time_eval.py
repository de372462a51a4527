"""What a run's own scoring (eval_at_end, eval_every) costs beside its training, on this machine.

Times, for the default job unless overrides say otherwise: training the eval classifier (once per data set
and shape, into a fresh cache), one score (eval.n samples, their features, FID / KID and the floor; the
median of --repeats), and the training step (the median of --steps steps after a warm-up), from which the
training time of the whole job is extrapolated. Prints each figure and the score's share of the job.

    python scripts/time_eval.py                       # the default job
    python scripts/time_eval.py eval.n=1024 eval.sample_steps=100
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ddpm.config import train_config
from ddpm.data.batch import Batch
from ddpm.diffusion.sampling import SamplingOptions
from ddpm.training.scores import RunScorer, prepare_classifier
from ddpm.training.setup import setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="ddpm-train overrides, e.g. eval.n=1024")
    parser.add_argument("--repeats", type=int, default=3, help="scores timed (median)")
    parser.add_argument("--steps", type=int, default=20, help="training steps timed (median)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = train_config([*args.overrides, f"eval.classifier_cache={tmp}/cache"])
        began = time.perf_counter()
        prepare_classifier(cfg)
        classifier_s = time.perf_counter() - began

        run = setup(cfg, Path(tmp) / "run")
        scorer, _ = RunScorer.for_run(cfg, run.dataset, run.runtime.device, multirun=True)
        assert scorer is not None
        scores = []
        for i in range(args.repeats):
            began = time.perf_counter()
            scorer.score(run.sampling_model(0), 0, Path(tmp) / f"eval{i}")
            scores.append(time.perf_counter() - began)

        batch = Batch.collate([run.dataset[i] for i in range(cfg.batch_size)]).to(run.runtime.device)
        steps = []
        for step in range(1, args.steps + 3):
            began = time.perf_counter()
            run.train_step(step, batch)
            steps.append(time.perf_counter() - began)
        step_s = statistics.median(steps[2:])  # after two warm-up steps

    score_s, job_s = statistics.median(scores), step_s * cfg.steps
    print(f"device: {run.runtime.describe()} | torch {torch.__version__} | {torch.get_num_threads()} threads")
    print(f"eval classifier ({cfg.eval.classifier_steps} steps, once, cached): {classifier_s:.1f} s")
    steps = SamplingOptions.from_config(cfg.eval).steps(cfg.timesteps)
    print(
        f"one score ({cfg.eval.n} samples, {cfg.eval.sampler} {steps} steps, against "
        f"{cfg.eval.n_real} real): median {score_s:.1f} s of {args.repeats}"
    )
    print(
        f"training step (batch {cfg.batch_size}): median {1000 * step_s:.0f} ms; {cfg.steps} steps ~ "
        f"{job_s:.0f} s; one score at the end is {100 * score_s / job_s:.1f}% of that"
    )


if __name__ == "__main__":
    main()
