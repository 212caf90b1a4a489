"""Cosine noise schedule (s = 0.008) and the per-step constants derived from it."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def cosine_betas(timesteps: int, s: float = 0.008) -> Tensor:
    """beta_t = clip(1 - abar(t+1)/abar(t), 0, 0.999), abar(k) = f(k)/f(0), in float64."""
    k = torch.arange(timesteps + 1, dtype=torch.float64)
    f = torch.cos(((k / timesteps) + s) / (1 + s) * math.pi / 2) ** 2
    alphas_bar = f / f[0]
    return (1 - alphas_bar[1:] / alphas_bar[:-1]).clamp(0, 0.999)


def schedule_constants(timesteps: int) -> dict[str, Tensor]:
    """Every constant the diffusion needs, indexed by t = 0 ... T-1 (computed in float64, stored float32)."""
    betas = cosine_betas(timesteps)
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    constants = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
        "sqrt_recip_alphas_cumprod": (1 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / alphas_cumprod - 1).sqrt(),
        # inner-loop (opt_step) step size eta_t = beta_t * sqrt(1 / (1 - abar_t))
        "opt_step_size": betas * (1 / (1 - alphas_cumprod)).sqrt(),
    }
    return {name: value.float() for name, value in constants.items()}
