"""A straightforward implementation of the spec, used only as the yardstick for the fast library path.

It shares the library's model *weights* (it takes our `EBM` module and reads run 0 of its packed
layers) but computes everything the plain way, as a first implementation of /work/shared/ired_spec.md
would, on unpacked [B, dim] tensors:

- the time MLP runs once per *sample*, fc1 is applied to cat([x, y]) on every energy evaluation;
- the denoiser grad_y E comes from `torch.autograd.grad(..., create_graph=True)` everywhere
  (training, mining and sampling alike);
- opt_step evaluates energy and gradient at y, then runs a *separate* energy forward at the proposal
  for the rejection test;
- training data come from a per-sample numpy generator in a torch DataLoader.

Nothing here is imported by the library: it is the tests' oracle. `tests/test_equivalence.py` checks that
both paths compute the same numbers (the speed-ups in benchmarks/results.md were timed against it by an
earlier benchmark script).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from diffusion_lib import EBM, GaussianDiffusion1D


# -- schedule helpers (the spec's formulas, reading the diffusion's float32 constants) -----------------
def _at(diffusion: GaussianDiffusion1D, name: str, t: Tensor) -> Tensor:
    return getattr(diffusion, name)[t].unsqueeze(-1)


def q_sample(diffusion: GaussianDiffusion1D, y0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    return _at(diffusion, "sqrt_alphas_cumprod", t) * y0 + _at(diffusion, "sqrt_one_minus_alphas_cumprod", t) * noise


def x0_from_noise(diffusion: GaussianDiffusion1D, y_t: Tensor, t: Tensor, noise: Tensor | float) -> Tensor:
    return (
        _at(diffusion, "sqrt_recip_alphas_cumprod", t) * y_t
        - _at(diffusion, "sqrt_recipm1_alphas_cumprod", t) * noise
    )


# -- the energy, the plain way ---------------------------------------------------------------------
def linear(layer: torch.nn.Module, x: Tensor) -> Tensor:
    """Run 0's weights of a packed layer, as an ordinary nn.Linear."""
    return F.linear(x, layer.weight[0], layer.bias[0])


def plain_energy(ebm: EBM, x: Tensor, y: Tensor, t: Tensor) -> Tensor:
    """E(x, y, t) [B, 1]: time MLP per sample, fc1 on cat([x, y]), FiLM, sum of squares of fc4."""
    emb = ebm.time_mlp[0](t).to(x.dtype)
    emb = linear(ebm.time_mlp[3], F.gelu(linear(ebm.time_mlp[1], emb)))
    gain2, shift2 = linear(ebm.t_map_fc2, emb).chunk(2, dim=-1)
    gain3, shift3 = linear(ebm.t_map_fc3, emb).chunk(2, dim=-1)
    h = F.silu(linear(ebm.fc1, torch.cat([x, y], dim=-1)))
    h = F.silu(linear(ebm.fc2, h) * (1 + gain2) + shift2)
    h = F.silu(linear(ebm.fc3, h) * (1 + gain3) + shift3)
    return linear(ebm.fc4, h).pow(2).sum(dim=-1, keepdim=True)


def plain_energy_and_grad(ebm: EBM, x: Tensor, y: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Energy and grad_y E by autograd, keeping the graph (create_graph=True) as the reference does."""
    with torch.enable_grad():
        y = y.detach().requires_grad_(True)
        energy = plain_energy(ebm, x, y, t)
        (grad,) = torch.autograd.grad(energy.sum(), y, create_graph=True)
    return energy, grad


# -- opt_step, mining and the training loss ------------------------------------------------------------
def plain_opt_step(
    diffusion: GaussianDiffusion1D, x: Tensor, y: Tensor, t: Tensor, steps: int, scale: float = 1.0
) -> Tensor:
    """`steps` of energy descent; a separate energy forward at each proposal decides acceptance."""
    ebm = diffusion.model.ebm
    bound = diffusion.data_bound * _at(diffusion, "sqrt_alphas_cumprod", t)
    step_size = _at(diffusion, "opt_step_size", t) * scale
    for _ in range(steps):
        energy, grad = plain_energy_and_grad(ebm, x, y, t)
        proposal = torch.clamp(y - step_size * grad, -bound, bound)
        new_energy = plain_energy(ebm, x, proposal, t)
        rejected = new_energy > energy  # keep the old y where the step raised the energy
        y = torch.where(rejected, y, proposal).detach()
    return y


def plain_negatives(
    diffusion: GaussianDiffusion1D, x: Tensor, y0: Tensor, t: Tensor, noise_pos: Tensor
) -> Tensor:
    """Mined negatives at noise level t (before clamp-and-renoise) for `random` or `adversarial`."""
    cfg = diffusion.mining_config
    start = q_sample(diffusion, y0, t, cfg["noise_scale"] * noise_pos)
    if cfg["strategy"] == "random":
        return start
    if cfg["strategy"] == "adversarial":
        return plain_opt_step(diffusion, x, start, t, cfg["opt_steps"], cfg["scale_factor"])
    raise ValueError(f"straightforward path covers none/random/adversarial, not {cfg['strategy']!r}")


def plain_loss_given_noise(
    diffusion: GaussianDiffusion1D,
    x: Tensor,
    y0: Tensor,
    t: Tensor,
    noise: Tensor,
    noise_pos: Tensor | None = None,
) -> Tensor:
    """The spec's training loss with t and the noises given explicitly (so tests can share them)."""
    ebm = diffusion.model.ebm
    _, eps_hat = plain_energy_and_grad(ebm, x, q_sample(diffusion, y0, t, noise), t)
    loss_mse = (eps_hat - noise).pow(2).mean(dim=-1)
    if diffusion.mining_config["strategy"] == "none":
        return loss_mse.mean()
    assert noise_pos is not None, "a supervised strategy needs the positive's noise"
    y_pos = q_sample(diffusion, y0, t, noise_pos)
    y_neg = plain_negatives(diffusion, x, y0, t, noise_pos)
    x0_neg = x0_from_noise(diffusion, y_neg, t, 0.0).clamp(-diffusion.data_bound, diffusion.data_bound)
    y_neg = q_sample(diffusion, x0_neg, t, noise_pos)
    energy_pos = plain_energy(ebm, x, y_pos, t)
    energy_neg = plain_energy(ebm, x, y_neg, t)
    logits = torch.cat([-energy_pos, -energy_neg], dim=-1)
    target = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # the positive is class 0
    loss_energy = F.cross_entropy(logits, target, reduction="none")
    return (loss_mse + diffusion.mining_config["loss_scale"] * loss_energy).mean()


def plain_loss(
    diffusion: GaussianDiffusion1D, x: Tensor, y0: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """The training loss drawing t, eps, eps' from `generator` in the library's order (t, eps, eps')."""
    batch, device = y0.shape[0], y0.device
    t = torch.randint(0, diffusion.num_timesteps, (batch,), device=device, generator=generator)
    noise = torch.randn(y0.shape, device=device, generator=generator)
    noise_pos = None
    if diffusion.mining_config["strategy"] != "none":
        noise_pos = torch.randn(y0.shape, device=device, generator=generator)
    return plain_loss_given_noise(diffusion, x, y0, t, noise, noise_pos)


# -- inference -------------------------------------------------------------------------------------
def plain_sample(diffusion: GaussianDiffusion1D, x: Tensor, noise: Tensor, inner_steps: int = 5) -> Tensor:
    """The spec's sampler: T denoising steps, each followed by `inner_steps` of plain_opt_step."""
    ebm, bound = diffusion.model.ebm, diffusion.data_bound
    y, x0 = noise, noise
    for step in reversed(range(diffusion.num_timesteps)):
        t = torch.full((x.shape[0],), step, dtype=torch.long, device=x.device)
        _, eps_hat = plain_energy_and_grad(ebm, x, y, t)
        x0 = x0_from_noise(diffusion, y, t, eps_hat.detach()).clamp(-bound, bound)
        scale_t = diffusion.sqrt_alphas_cumprod[step]
        y = scale_t * x0
        if inner_steps > 0:
            y = plain_opt_step(diffusion, x, y, t, inner_steps, diffusion.inference_step_scale)
        y = y.clamp(-bound * scale_t, bound * scale_t)
        x0 = y / scale_t
        if step > 0:
            y = diffusion.sqrt_alphas_cumprod[step - 1] * x0
    return x0.detach()


# -- data: one numpy problem at a time, batched by a DataLoader -----------------------------------------
class NumpyInverseDataset(IterableDataset):
    """Endless inverse-task problems made one at a time with numpy: A = 2 U U^T + 0.5 I, y = A^-1."""

    def __init__(self, rank: int, seed: int = 0, ood: bool = False):
        self.rank, self.seed, self.lam = rank, seed, 0.1 if ood else 0.5

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        rng = np.random.default_rng(self.seed)
        n = self.rank
        while True:
            u = rng.uniform(-1.0, 1.0, size=(n, n))
            a = 2 * u @ u.T + self.lam * np.eye(n)
            yield a.reshape(-1).astype(np.float32), np.linalg.inv(a).reshape(-1).astype(np.float32)


def numpy_loader(rank: int, batch_size: int, seed: int = 0) -> DataLoader:
    return DataLoader(NumpyInverseDataset(rank, seed), batch_size=batch_size, num_workers=0)
