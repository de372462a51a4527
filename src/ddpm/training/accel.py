"""What the network runs as in a training step: bf16 autocast, torch.compile, DistributedDataParallel, as
the Runtime decides. (How a step is launched, eagerly or replayed as a CUDA graph, is capture.py's.)"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ddpm.runtime import Runtime


class Autocast(nn.Module):
    """The U-Net under bf16 autocast, giving float32 out, so the loss and everything after it stay fp32."""

    def __init__(self, net: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.net, self.dtype = net, dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            out = self.net(x, t, labels)
        return out.float()


def prepare_net(model: nn.Module, runtime: Runtime) -> nn.Module:
    """What the step runs: the model under the runtime's precision, compiled where it says, and wrapped for
    DistributedDataParallel on several ranks (outermost, so DDP sees the model's own parameters; its
    gradients are then all-reduced once the compiled backward ends)."""
    return distribute(fast_net(model, runtime), runtime)


def fast_net(model: nn.Module, runtime: Runtime) -> nn.Module:
    """The model under the runtime's precision, compiled where it says: what one rank computes."""
    net = model if runtime.precision == torch.float32 else Autocast(model, runtime.precision)
    if runtime.compile:
        # static shapes: every batch has batch_size images (partial batches are dropped); one graph per
        # forward where a single process runs it
        net = torch.compile(net, fullgraph=not runtime.distributed, dynamic=False)
    return net


def distribute(net: nn.Module, runtime: Runtime) -> nn.Module:
    if not runtime.distributed:
        return net
    device_ids = [runtime.device] if runtime.device.type == "cuda" else None
    return DistributedDataParallel(net, device_ids=device_ids)
