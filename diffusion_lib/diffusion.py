"""GaussianDiffusion1D: energy diffusion training loss (score + contrastive energy), opt_step, sampling."""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .mining import mining_strategy, resolve_mining_config
from .models import EnergyCondition, EnergyDenoiser
from .schedule import schedule_constants
from .utils import default


class GaussianDiffusion1D(nn.Module):
    """Energy diffusion over flat answers y given conditions x (the spec's IRED, continuous tasks).

    `mining_config` picks how negatives for the energy loss are made (see `mining.py`); when omitted it
    is derived from the reference flag `supervise_energy_landscape` (False -> none, True -> adversarial).
    `use_innerloop_opt` only switches inference's inner steps (5 or 0); `inference_steps` overrides it.
    """

    def __init__(
        self,
        model: EnergyDenoiser,
        *,
        timesteps: int = 10,
        mining_config: Mapping[str, Any] | None = None,
        supervise_energy_landscape: bool = True,
        use_innerloop_opt: bool = True,
        inference_steps: int | None = None,
        inference_step_scale: float = 1.0,
        data_bound: float = 2.0,
    ):
        super().__init__()
        if timesteps < 1:
            raise ValueError(f"timesteps = {timesteps} is invalid: must be an int >= 1")
        self.model = model
        self.num_timesteps = timesteps
        self.mining_config = resolve_mining_config(mining_config, supervise_energy_landscape)
        self.strategy = mining_strategy(self.mining_config)
        self.inference_steps = default(inference_steps, 5 if use_innerloop_opt else 0)
        self.inference_step_scale = inference_step_scale
        # answers live in [-data_bound, data_bound]; 2 on continuous tasks (1 on discrete ones)
        self.data_bound = data_bound
        for name, value in schedule_constants(timesteps).items():
            self.register_buffer(name, value, persistent=False)

    # -- schedule helpers ------------------------------------------------------------------------
    def _at(self, name: str, t: Tensor) -> Tensor:
        return getattr(self, name)[t].unsqueeze(-1)

    def q_sample(self, y0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return self._at("sqrt_alphas_cumprod", t) * y0 + self._at("sqrt_one_minus_alphas_cumprod", t) * noise

    def x0_from_noise(self, y_t: Tensor, t: Tensor, noise: Tensor | float) -> Tensor:
        return self._at("sqrt_recip_alphas_cumprod", t) * y_t - self._at("sqrt_recipm1_alphas_cumprod", t) * noise

    def condition(self, x: Tensor, t: Tensor) -> EnergyCondition:
        return self.model.condition(x, t, self.num_timesteps)

    # -- inner optimiser, shared by mining and inference --------------------------------------------
    @torch.no_grad()
    def opt_step(
        self, cond: EnergyCondition, y: Tensor, t: Tensor, steps: int, scale: float = 1.0
    ) -> tuple[Tensor, Tensor]:
        """`steps` of gradient descent on the energy with per-sample rejection of energy-raising steps.

        Returns the final y and the fraction of (sample, step) pairs accepted. The step is
        eta_t * scale on every step, and the clamp bound uses each sample's own t.
        """
        bound = self.data_bound * self._at("sqrt_alphas_cumprod", t)
        step_size = self._at("opt_step_size", t) * scale
        energy, grad = self.model.energy_and_grad(cond, y)
        accepted = y.new_zeros(())
        for i in range(steps):
            proposal = torch.clamp(y - step_size * grad, -bound, bound)
            last = i == steps - 1
            # the energy at the proposal doubles as the next step's starting energy (one pass, not two)
            new_energy, new_grad = self.model.energy_and_grad(cond, proposal, need_grad=not last)
            keep = new_energy <= energy
            y = torch.where(keep, proposal, y)
            energy = torch.where(keep, new_energy, energy)
            if not last:
                grad = torch.where(keep, new_grad, grad)
            accepted = accepted + keep.float().mean()
        return y, accepted / max(steps, 1)

    # -- training loss -------------------------------------------------------------------------------
    def forward(
        self, x: Tensor, y0: Tensor, step: int = 0, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor | float]]:
        """Loss for one batch and its parts (detached), the mining statistics included."""
        batch, device = y0.shape[0], y0.device
        t = torch.randint(0, self.num_timesteps, (batch,), device=device, generator=generator)
        noise = torch.randn(y0.shape, device=device, generator=generator)
        cond = self.condition(x, t)
        _, eps_hat = self.model.energy_and_grad(cond, self.q_sample(y0, t, noise))
        loss_denoise = (eps_hat - noise).pow(2).mean(dim=-1)
        stats: dict[str, Tensor | float] = {"loss_denoise": loss_denoise.mean().detach(), "grad_evals": 1.0}
        if self.strategy.mine is None:
            loss = loss_denoise.mean()
            stats["loss"] = loss.detach()
            return loss, stats

        cfg = self.mining_config
        noise_pos = torch.randn(y0.shape, device=device, generator=generator)
        y_pos = self.q_sample(y0, t, noise_pos)
        negatives = self.strategy.mine(self, cond.detach(), y0, t, noise_pos, cfg, step)
        x0_neg = self.x0_from_noise(negatives.y, t, 0.0).clamp(-self.data_bound, self.data_bound)
        y_neg = self.q_sample(x0_neg, t, noise_pos)
        # one pass for both: y stacked as [2, B, D], over which the per-sample condition broadcasts
        energy, _ = self.model.energy_and_grad(cond, torch.stack([y_pos, y_neg]), need_grad=False)
        energy_pos, energy_neg = energy.unbind(0)
        # cross-entropy with the positive as the right class among logits [-E+, -E-]
        loss_energy = F.softplus(energy_pos - energy_neg).squeeze(-1)
        loss = (loss_denoise + cfg["loss_scale"] * loss_energy).mean()
        stats.update(
            loss=loss.detach(),
            loss_energy=loss_energy.mean().detach(),
            energy_pos=energy_pos.mean().detach(),
            energy_neg=energy_neg.mean().detach(),
            grad_evals=1.0 + negatives.grad_evals,
        )
        if negatives.accept_rate is not None:
            stats["accept_rate"] = negatives.accept_rate
        return loss, stats

    # -- inference -----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        x: Tensor,
        noise: Tensor | None = None,
        inner_steps: int | None = None,
        step_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Answers for conditions x: T denoising steps, each followed by `inner_steps` of opt_step."""
        inner_steps = default(inner_steps, self.inference_steps)
        step_scale = default(step_scale, self.inference_step_scale)
        batch = x.shape[0]
        y = default(noise, lambda: torch.randn(batch, self.model.out_dim, device=x.device, generator=generator))
        for step in reversed(range(self.num_timesteps)):
            t = torch.full((batch,), step, device=x.device, dtype=torch.long)
            cond = self.condition(x, t)
            _, eps_hat = self.model.energy_and_grad(cond, y)
            x0 = self.x0_from_noise(y, t, eps_hat).clamp(-self.data_bound, self.data_bound)
            scale_t = self.sqrt_alphas_cumprod[step]
            y = scale_t * x0
            if inner_steps > 0:
                y, _ = self.opt_step(cond, y, t, inner_steps, step_scale)
            y = y.clamp(-self.data_bound * scale_t, self.data_bound * scale_t)
            x0 = y / scale_t
            if step > 0:
                y = self.sqrt_alphas_cumprod[step - 1] * x0
        return x0
