"""Exponential moving average of the weights: ema-pytorch's, with the warm-up the reference runs used.

The trainer calls `update()` once per optimiser step, so ema-pytorch's update count is the training step
(one count for a pack: its runs' weights are stacked in one model). The update made after `step` steps,
when `step` is a multiple of `update_every`, is a plain copy up to `update_after_step`, then moves towards
the online model with decay min(beta, 1 - (1 + step - update_after_step)^-power). With the reference
values (beta 0.995, every 10, after 100, power 2/3) the decay reaches 0.995 only near step 2 900, so an
EMA read early in training lags well behind the model it averages.
"""
from __future__ import annotations

from ema_pytorch import EMA
from torch import nn

from diffusion_lib.harness.config import TrainConfig


def make_ema(model: nn.Module, train: TrainConfig) -> EMA:
    """The EMA of `model` as `train.ema_*` say; its averaged copy is `.ema_model` (`.model` is `model`)."""
    return EMA(
        model, beta=train.ema_decay, update_every=train.ema_every, update_after_step=train.ema_update_after_step,
        power=train.ema_power, inv_gamma=1.0, min_value=0.0,
        include_online_model=False,  # the trainer saves the online model itself
        ignore_names={name for name, _ in model.named_buffers()},  # the noise schedule's constants
        use_foreach=True,
    )


def restore_ema_step(ema: EMA, step: int) -> None:
    """Continue, after a resume at `step`, as an EMA that has made `step` updates (the first: its copy).

    Its step counter stays where ema-pytorch keeps it, on the host: reading it costs no device sync."""
    ema.step.fill_(step)
    ema.initted.fill_(step > 0)
