"""Exponential moving average of the weights, with the warm-up the reference runs used (ema-pytorch's).

The averaged model is updated every `update_every` steps. Up to `update_after_step` it is a plain copy;
after that it moves towards the online model with decay min(beta, 1 - (1 + steps_since_warmup)^-power).
With the reference values (beta 0.995, every 10, after 100, power 2/3) the decay reaches 0.995 only
near step 2 900, so an EMA read early in training lags well behind the model it averages.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, beta: float, update_every: int, update_after_step: int, power: float):
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.beta, self.update_every = beta, update_every
        self.update_after_step, self.power = update_after_step, power

    def decay(self, step: int) -> float:
        """The weight of the old average at the update made after `step` optimiser steps (0: a copy)."""
        since = step - self.update_after_step
        return 0.0 if since <= 0 else min(self.beta, 1 - (1 + since) ** -self.power)

    @torch.no_grad()
    def update(self, online: nn.Module, step: int) -> None:
        """Called once per optimiser step, with the number of steps taken before this one."""
        if step % self.update_every:
            return
        averaged, current = list(self.model.parameters()), list(online.parameters())
        decay = self.decay(step)
        if decay == 0.0:
            torch._foreach_copy_(averaged, current)
        else:
            torch._foreach_lerp_(averaged, current, 1 - decay)
