"""The training state a checkpoint carries besides the weights: optimizer moments, the RNG
states (Python, NumPy, torch CPU and CUDA) and the position in the data order. Restored, it makes a resumed
run's steps the same computations as an uninterrupted run's, so on a CPU the weights end up bit-identical.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


# ------------------------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """Every random number generator the loop may draw from, in types that weights_only loading reads."""
    _, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    # A run resumed on another kind of machine keeps going; only its random draws differ from the original.
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------- the whole state
def training_state(
    optimizer: torch.optim.Optimizer,
    n_images: int,
    position: tuple[int, int],
    elapsed_s: float,
) -> dict[str, Any]:
    """What a checkpoint carries besides the weights; ``position`` is (epoch, batch) of the next step."""
    return {
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
        "data": {"n_images": n_images, "epoch": position[0], "batch": position[1]},
        "elapsed_s": elapsed_s,
    }


def restore(
    saved: dict[str, Any],
    model: torch.nn.Module,
    ema_model: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
) -> tuple[int, float]:
    """Load a checkpoint's weights and state into freshly built objects; returns (step, elapsed_s).
    The RNG states go last: building the objects drew from the generators. The learning rate of each step
    is a function of the step (step.py), so the LR schedule's state that earlier versions saved is not
    read."""
    model.load_state_dict(saved["model"])
    if ema_model is not None:
        ema_model.load_state_dict(saved["ema"])
    state = saved["state"]
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    return saved["step"], state["elapsed_s"]
