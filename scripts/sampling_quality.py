"""Quality per second of the samplers on one checkpoint: for each sampler setting, FID and KID of the same
number of samples (the same x_T for every setting) in the data set's classifier features and in raw pixels,
with the real-vs-real floor beside them, and the seconds the sampling took. Seeds give the spread.

    python scripts/sampling_quality.py runs/<run>/checkpoints/last.pt
    python scripts/sampling_quality.py CKPT --n 512 --seeds 0 1 2 --settings ddpm:200 ddpm:50 ddim:50

Prints a Markdown table (median over the seeds, and the spread as min-max) and writes it to --out.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ddpm.diffusion.generate import generate
from ddpm.diffusion.sampling import SAMPLERS, SamplingOptions
from ddpm.errors import DdpmError
from ddpm.evaluation.evaluate import Scorer, real_data_config
from ddpm.trained import load_trained

SETTINGS = ["ddpm:all", "ddpm:100", "ddpm:50", "ddpm:25", "ddim:50", "ddim:100", "dpm_solver++:20"]


def options(setting: str) -> SamplingOptions:
    """``sampler:steps`` (steps: all or N >= 1), or a one-line exit naming the choices."""
    sampler, _, steps = setting.partition(":")
    if sampler not in SAMPLERS or not (steps == "all" or (steps.isdigit() and int(steps) >= 1)):
        raise SystemExit(
            f"--settings {setting!r} is not sampler:steps with a sampler of {', '.join(SAMPLERS)} "
            "and steps all or N >= 1"
        )
    return SamplingOptions(sampler=sampler, sample_steps=None if steps == "all" else int(steps))


def cell(values: list[float], digits: int) -> str:
    """The median and, in brackets, the range."""
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{mid:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("ckpt")
    parser.add_argument("--n", type=int, default=512, help="samples per setting and seed")
    parser.add_argument("--n-real", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", default=SETTINGS, help="sampler:steps (steps: all or N)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("sampling_quality.md"))
    parser.add_argument(
        "--scoring-overrides",
        nargs="+",
        default=[],
        help="scoring/default.yaml keys, e.g. classifier_cache=DIR kid_subsets=10",
    )
    args = parser.parse_args()
    settings = [options(setting) for setting in args.settings]  # every setting checked before any work

    device = torch.device("cpu")
    try:
        trained = load_trained(args.ckpt, device)
    except DdpmError as e:
        raise SystemExit(str(e)) from None
    scoring = OmegaConf.load(Path(__file__).parents[1] / "configs/scoring/default.yaml")
    scoring.merge_with_dotlist(args.scoring_overrides)
    scoring.n, scoring.n_real, scoring.seed = args.n, args.n_real, 0
    scorer = Scorer(scoring, real_data_config(trained.data), device, ["classifier", "pixels"])

    header = "| sampler | steps | s / sample set | FID classifier | KID classifier | FID pixels |"
    lines = [header, "| --- | --- | --- | --- | --- | --- |"]
    floors: dict[str, float] = {}
    for sampling in settings:
        seconds, fids, kids, pixel_fids = [], [], [], []
        for seed in args.seeds:
            began = time.perf_counter()
            fake = generate(trained, sampling, args.n, seed, args.batch_size)
            seconds.append(time.perf_counter() - began)
            report, _ = scorer.report(fake, {})
            clf, pix = report["features"]["classifier"], report["features"]["pixels"]
            fids.append(clf["fid"])
            kids.append(clf["kid"])
            pixel_fids.append(pix["fid"])
            floors = {"classifier": clf.get("fid_floor"), "pixels": pix.get("fid_floor")}

        steps = sampling.steps(trained.diffusion.timesteps)
        line = (
            f"| {sampling.sampler} | {steps} | {statistics.median(seconds):.1f} | {cell(fids, 3)} | "
            f"{cell(kids, 4)} | {cell(pixel_fids, 3)} |"
        )
        lines.append(line)
        print(line, flush=True)
    floor = (
        f"real vs real ({args.n} other real images against the same {scorer.n_real}): FID classifier "
        f"{floors['classifier']:.3f}, FID pixels {floors['pixels']:.3f}"
        if floors.get("classifier") is not None
        else "real vs real: the data set has too few images for a floor at this n"
    )
    text = "\n".join(
        [
            f"{args.ckpt} (step {trained.step}, {trained.weights} weights), {args.n} samples per setting, "
            f"seeds {args.seeds}; median (min-max) over the seeds; {floor}",
            "",
            *lines,
        ]
    )
    args.out.write_text(text + "\n")
    print(floor)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
