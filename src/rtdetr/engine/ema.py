"""Exponential moving average of the weights (official `src/optim/ema.py` ModelEMA), used for evaluation,
`best.pt` and export."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


class ModelEMA:
    """v = d * v + (1 - d) * model_v for every floating state_dict entry (parameters and BatchNorm running
    statistics), after each optimizer step, with d = decay * (1 - exp(-updates / warmups)): early updates
    follow the model closely, later ones average over ~1 / (1 - decay) steps. Integer buffers
    (num_batches_tracked) keep their initial copy, as the official code.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmups: int = 2000) -> None:
        self.module = copy.deepcopy(model).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)
        self.decay = decay
        self.warmups = warmups
        self.updates = 0

    def decay_at(self, updates: int) -> float:
        """The decay used by update number `updates` (1-based)."""
        return self.decay if self.warmups <= 0 else self.decay * (1 - math.exp(-updates / self.warmups))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold in `model`'s current weights (the unwrapped model, not a DDP wrapper)."""
        self.updates += 1
        d = self.decay_at(self.updates)
        current = model.state_dict()
        averaged = {name: v for name, v in self.module.state_dict().items() if v.dtype.is_floating_point}
        # v + (1 - d) * (model_v - v) = d * v + (1 - d) * model_v, one fused call for all tensors
        torch._foreach_lerp_(list(averaged.values()), [current[name].detach() for name in averaged], 1 - d)
