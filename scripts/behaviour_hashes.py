"""Hashes of what tiny runs produce, to show that a change leaves behaviour as it was: run it with the
console scripts of two checkouts (each installed in its own environment) and diff the outputs.

    python scripts/behaviour_hashes.py --bin /path/to/old/.venv/bin --out /tmp/old > old.txt
    python scripts/behaviour_hashes.py --out /tmp/new > new.txt && diff old.txt new.txt

Eleven tiny ddpm-train configs (the default, each objective and loss, Min-SNR, offset noise with grad_accum
and clipping, warm-up with cosine decay, no EMA with flips, the DataLoader path, Ho et al.'s U-Net with
attention and dropout, the skip of non-finite steps, the other samplers' grids), then ddpm-sample on the
checkpoint and export in tests/fixtures (written by an earlier version) with four sampler settings. One
line per artefact: the metrics rows (timings left out) and their lr (as float32) apart, every
PNG but loss.png (whose title holds the run directory), the weights, the EMA and Adam's moments of each
checkpoint (not the file: it holds the run directory too).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

# The tests' tiny U-Net (tests/conftest.py's TINY), written out here: both checkouts under comparison must
# run the very same configs, whatever each one's tests say.
TINY = [
    "model.dim=8",
    "model.dim_mults=[1,2]",
    "model.resnet_block_groups=2",
    "model.attn_heads=2",
    "model.attn_dim_head=8",
    "batch_size=16",
    "sample_n=4",
    "log_every=1",
    "device=cpu",
    "precision=fp32",
    "steps=6",
    "timesteps=20",
    "sample_every=3",
    "checkpoint_every=3",
    "forward_n=2",
]
TRAIN = {
    "default": [],
    "l1_x0": ["loss=l1", "objective=x0"],
    "l2_v_snr": ["loss=l2", "objective=v", "min_snr_gamma=5"],
    "offset_accum_clip": ["offset_noise=0.1", "grad_accum=2", "grad_clip=0.5"],
    "warmup_cosine": ["lr_warmup=2", "lr_decay=cosine"],
    "noema_hflip": ["ema.decay=0", "data.hflip=true"],
    "loader": ["data.on_device=false"],
    "ho2020": ["model=ho2020", "model.dim=32", "model.attn_resolutions=[4]", "model.dropout=0.1"],
    "skip": ["on_nonfinite=skip"],
    "ddim": ["sampler=ddim", "sample_steps=5"],
    "dpm": ["sampler=dpm_solver++", "sample_steps=5"],
}
SAMPLE = {
    "ddpm": [],
    "ddpm_large": ["ddpm_variance=large"],
    "ddim": ["sampler=ddim", "sample_steps=5", "eta=0.5"],
    "dpm": ["sampler=dpm_solver++", "sample_steps=4"],
}
TIMINGS = ("img_per_s", "elapsed_s", "peak_mem_gb")


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode() + tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def metrics_digests(path: Path) -> dict[str, str]:
    """The rows without their timings, and apart from them the lr (as float32, however it was written),
    so that a diff says which of the two changed."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    lrs = [float(np.float32(row.pop("lr"))) for row in rows]
    for row in rows:
        for key in TIMINGS:
            row.pop(key, None)
    return {
        "metrics": digest(json.dumps(rows, sort_keys=True).encode()),
        "lr": digest(json.dumps(lrs).encode()),
    }


def checkpoint_digests(path: Path) -> dict[str, str]:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    moments = {
        f"{i}.{k}": v
        for i, state in payload["state"]["optimizer"]["state"].items()
        for k, v in state.items()
        if isinstance(v, torch.Tensor)
    }
    out = {"model": tensors_digest(payload["model"]), "adam": tensors_digest(moments)}
    if "ema" in payload:
        out["ema"] = tensors_digest(payload["ema"])
    return out


def run(command: list[str]) -> bool:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        print(f"FAILED {' '.join(command)}: {result.stderr.strip().splitlines()[-1:]}")
    return result.returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(sys.executable).parent
    parser.add_argument("--bin", type=Path, default=here, help="the folder of ddpm-train and ddpm-sample")
    parser.add_argument("--out", type=Path, required=True, help="an empty folder for the runs")
    parser.add_argument("--fixtures", type=Path, default=Path(__file__).parents[1] / "tests/fixtures")
    args = parser.parse_args()
    for name, overrides in TRAIN.items():
        run_dir = args.out / name
        tiny = [a for a in TINY if not a.startswith("model.")] if name == "ho2020" else TINY
        if not run([str(args.bin / "ddpm-train"), *tiny, *overrides, f"hydra.run.dir={run_dir}"]):
            continue
        for part, value in metrics_digests(run_dir / "metrics.jsonl").items():
            print(name, part, value)
        for png in sorted(run_dir.rglob("*.png")):
            if png.name != "loss.png":
                print(name, png.relative_to(run_dir), digest(png.read_bytes()))
        for ckpt in sorted((run_dir / "checkpoints").glob("step_*.pt")):
            for part, value in checkpoint_digests(ckpt).items():
                print(name, ckpt.name, part, value)
    for fixture in ("tiny_v2.pt", "tiny_v2.safetensors"):
        for name, overrides in SAMPLE.items():
            out = args.out / f"sample_{fixture}_{name}"
            command = [str(args.bin / "ddpm-sample"), f"ckpt={args.fixtures / fixture}", "n=6", "seed=3"]
            if run([*command, "device=cpu", *overrides, f"out={out}", f"hydra.run.dir={out}/hydra"]):
                print("sample", fixture, name, digest((out / "grid.png").read_bytes()))


if __name__ == "__main__":
    main()
