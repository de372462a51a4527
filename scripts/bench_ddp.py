"""What data-parallel training costs: ddpm-train alone beside torchrun with N ranks, the same global batch
and config, interleaved (A B A B ...), median img/s of the logged intervals after the first.

    python scripts/bench_ddp.py --nproc 2 --steps 60 --repeats 2            # the default job's shape
    python scripts/bench_ddp.py --nproc 2 -- device=cuda data=cifar10 ...   # anything ddpm-train takes

On a CPU, each of N ranks gets 1 / N of the cores (torchrun sets OMP_NUM_THREADS=1 per rank), so the
figure to read is the total against one process using all cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def run(nproc: int | None, steps: int, extra: list[str], folder: Path) -> float:
    """Median img/s of one run's logged intervals, the first left out (warm-up); ``nproc`` ranks under
    torchrun (1 too: what the launcher and the process group cost), or plain ddpm-train for None."""
    args = [f"steps={steps}", "log_every=10", "sample_every=0", "checkpoint_every=0", "forward_n=0", *extra]
    args.append(f"hydra.run.dir={folder}")
    command = [str(BIN / "ddpm-train")]
    if nproc is not None:
        command = [
            str(BIN / "torchrun"),
            "--standalone",
            f"--nproc-per-node={nproc}",
            "--no-python",
            *command,
        ]
    subprocess.run([*command, *args], check=True, capture_output=True)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["img_per_s"] for r in rows[1:])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="ddpm-train overrides for both")
    args = parser.parse_args()
    alone, ranks = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            start = time.perf_counter()
            alone.append(run(None, args.steps, args.overrides, Path(tmp) / f"alone_{i}"))
            ranks.append(run(args.nproc, args.steps, args.overrides, Path(tmp) / f"ddp_{i}"))
            print(
                f"round {i + 1}: 1 process {alone[-1]:,.0f} img/s, {args.nproc} ranks {ranks[-1]:,.0f} img/s "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    a, d = statistics.median(alone), statistics.median(ranks)
    print(
        f"1 process: {a:,.0f} img/s | {args.nproc} ranks: {d:,.0f} img/s in all, {d / args.nproc:,.0f} per "
        f"rank | {args.nproc} ranks / 1 process: {d / a:.2f}x"
    )


if __name__ == "__main__":
    main()
