"""A diffusers DDPMScheduler's scheduler_config.json as ddpm's config keys (schedule, T, objective, the
variance and the clipping), both ways. The schedules diffusers names are matched by their betas: ddpm's
linear, quadratic, sigmoid (on [-6, 6]) and cosine (s 0.008, max_beta 0.999) are diffusers' linear,
scaled_linear, sigmoid and squaredcos_cap_v2; any other schedule travels as its betas (trained_betas).
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from ddpm.diffusion.gaussian import resolve_variance
from ddpm.diffusion.schedules import make_betas
from ddpm.errors import CheckpointError
from ddpm.interop.unet2d import DIFFUSERS_VERSION

SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")  # the same betas, variance and clipping keys
OBJECTIVES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
VARIANCES = {
    "fixed_small": "small",
    "fixed_small_log": "small",
    "fixed_large": "large",
    "fixed_large_log": "large",
    "learned_range": "learned",
}
SIGMOID_RANGE = (-6.0, 6.0)  # diffusers' sigmoid schedule's fixed range
COSINE = {"s": 0.008, "max_beta": 0.999}  # squaredcos_cap_v2's constants


def run_keys_from_scheduler(config: dict[str, Any], where: str) -> dict[str, Any]:
    """The ddpm config keys a scheduler config gives: schedule, timesteps, objective, learn_sigma,
    ddpm_variance and clip_x0. A setting ddpm has no equivalent for raises one line."""
    name = config.get("_class_name", "DDPMScheduler")
    if name not in SCHEDULERS:
        raise CheckpointError(f"{where}'s scheduler is a {name}: ddpm reads {' and '.join(SCHEDULERS)}")
    variance = config.get("variance_type", "fixed_small")
    prediction = config.get("prediction_type", "epsilon")
    for key, value, known in (
        ("variance_type", variance, VARIANCES),
        ("prediction_type", prediction, OBJECTIVES),
    ):
        if value not in known:
            raise CheckpointError(f"{where}'s scheduler has {key} {value}: ddpm reads {', '.join(known)}")
    if config.get("thresholding", False):
        raise CheckpointError(f"{where}'s scheduler has thresholding on: ddpm clips x0 to [-1, 1] only")
    if config.get("clip_sample", True) and float(config.get("clip_sample_range", 1.0)) != 1.0:
        raise CheckpointError(
            f"{where}'s scheduler has clip_sample_range {config['clip_sample_range']}: ddpm clips to [-1, 1]"
        )
    timesteps = int(config.get("num_train_timesteps", 1000))
    return {
        "schedule": _schedule(config, timesteps, where),
        "timesteps": timesteps,
        "objective": OBJECTIVES[prediction],
        "learn_sigma": variance == "learned_range",
        "ddpm_variance": VARIANCES[variance],
        "clip_x0": bool(config.get("clip_sample", True)),
    }


def _schedule(config: dict[str, Any], timesteps: int, where: str) -> dict[str, Any]:
    zero_snr = bool(config.get("rescale_betas_zero_snr", False))
    return {**_betas(config, timesteps, where), "zero_terminal_snr": zero_snr}


def _betas(config: dict[str, Any], timesteps: int, where: str) -> dict[str, Any]:
    """The schedule config entry whose betas the scheduler's are (before any zero-SNR rescaling)."""
    betas = config.get("trained_betas")
    if betas is not None:
        if len(betas) != timesteps:
            raise CheckpointError(f"{where}'s scheduler has {len(betas)} trained_betas for {timesteps} steps")
        return {"name": "given", "betas": [float(b) for b in betas]}
    start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
    kind = config.get("beta_schedule", "linear")
    if kind == "linear":
        return {"name": "linear", "beta_start": start, "beta_end": end}
    if kind == "scaled_linear":
        return {"name": "quadratic", "beta_start": start, "beta_end": end}
    if kind == "sigmoid":
        lo, hi = SIGMOID_RANGE
        return {"name": "sigmoid", "beta_start": start, "beta_end": end, "start": lo, "end": hi}
    if kind == "squaredcos_cap_v2":
        return {"name": "cosine", **COSINE}
    raise CheckpointError(
        f"{where}'s scheduler has beta_schedule {kind}: ddpm reads linear, scaled_linear, sigmoid, "
        "squaredcos_cap_v2 and trained_betas"
    )


def scheduler_from_run(config: dict[str, Any]) -> dict[str, Any]:
    """The DDPMScheduler config of a run's config (a checkpoint's plain values)."""
    schedule = dict(config["schedule"])
    timesteps = int(config["timesteps"])
    learn_sigma = bool(config.get("learn_sigma", False))
    variance = resolve_variance(config.get("ddpm_variance", "auto"), learn_sigma).value
    named = _named_schedule(schedule)
    out: dict[str, Any] = {
        "_class_name": "DDPMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": timesteps,
        "beta_start": float(schedule.get("beta_start", 1e-4)),
        "beta_end": float(schedule.get("beta_end", 0.02)),
        "beta_schedule": named or "linear",
        "trained_betas": None,
        "variance_type": {"small": "fixed_small", "large": "fixed_large", "learned": "learned_range"}[
            variance
        ],
        "clip_sample": config.get("clip_x0") is not False,
        "clip_sample_range": 1.0,
        "prediction_type": {v: k for k, v in OBJECTIVES.items()}[config.get("objective", "eps")],
        "thresholding": False,
        "timestep_spacing": config.get("timestep_spacing", "linspace"),
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }
    if named is None:  # the betas themselves, with any zero-terminal-SNR rescaling already applied
        out["trained_betas"] = make_betas(OmegaConf.create(schedule), timesteps).tolist()
    return out


def _named_schedule(schedule: dict[str, Any]) -> str | None:
    """diffusers' name for a ddpm schedule where it computes the same betas, else None. A zero-terminal-SNR
    schedule travels as its betas: diffusers rescales in float32, off by up to 1e-3 relative at small t."""
    if schedule.get("zero_terminal_snr", False):
        return None
    name = schedule["name"]
    if name == "linear":
        return "linear"
    if name == "quadratic":
        return "scaled_linear"
    if name == "sigmoid" and (schedule["start"], schedule["end"]) == SIGMOID_RANGE:
        return "sigmoid"
    if name == "cosine" and all(schedule[k] == v for k, v in COSINE.items()):
        return "squaredcos_cap_v2"
    return None
