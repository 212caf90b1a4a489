"""GaussianDiffusion1D: energy diffusion training loss (score + contrastive energy), opt_step, sampling.

Tensors are packed: [P, B, dim] for P runs trained together (see models.py); a single run may pass
[B, dim]. Every random number of a training step comes from the run's own generator (`draw`), so a run
computes the same numbers whether it trains alone or in a pack.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lib.mining import STRATEGIES, resolve_mining_config
from diffusion_lib.models import EnergyDenoiser
from diffusion_lib.samplers import Sampled, resolve_sampler_config, run_sampler
from diffusion_lib.schedule import schedule_constants


def default(value: Any, fallback: Any) -> Any:
    """`value`, or `fallback` where it is None (an argument left to the model's setting)."""
    return fallback if value is None else value


# Given answer entries: (mask bool [P, B, D] or [B, D], True = given; their clean values [P, B, D] or [B, D])
Given = Tuple[Tensor, Tensor]


@dataclass
class Draws:
    """One training step's random numbers for a pack: t [P, B], the score noise and the positive's noise,
    and the uniforms [P, B, D] a task's corruption makes the 'random' negatives' start from."""

    t: Tensor
    noise: Tensor
    noise_pos: Tensor | None  # only strategies with an energy loss draw it
    uniform: Tensor | None = None  # only on tasks with a corruption, for strategies that start from it


@dataclass
class OptResult:
    """What `opt_step` did: the final y, the fraction of samples accepted at each inner step [P, steps],
    and the energy before the first and after the last step [P, B, 1]."""

    y: Tensor
    accepted: Tensor
    energy_start: Tensor
    energy: Tensor


class GaussianDiffusion1D(nn.Module):
    """Energy diffusion over flat answers y given conditions x (the spec's IRED, continuous tasks).

    `mining_config` (resolved: `resolve_mining_config`, as the run config holds it) picks how negatives for
    the energy loss are made (see `mining.py`); when omitted it is derived from the reference flag
    `supervise_energy_landscape` (False -> none, True -> adversarial).
    `use_innerloop_opt` only switches inference's inner steps (5 or 0); `inference_steps` overrides it.
    `inference_step_schedule` and `answer` reproduce the published sampler on request ('reference',
    'scaled'); the defaults follow the spec's intent (see README, "Where the published code differs").
    `sampler` picks the inference's inner steps, resolved {'name': ..., options} (samplers.py; 'ired').
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
        inference_step_schedule: str = "constant",
        answer: str = "x0",
        data_bound: float = 2.0,
        sampler: Mapping[str, Any] | None = None,
        corrupt: Callable[..., Tensor] | None = None,
    ):
        super().__init__()
        self.model = model
        self.num_timesteps = timesteps
        # the run config validated its values once; only the defaults are resolved here
        self.mining_config = mining_config or resolve_mining_config(None, supervise_energy_landscape)
        self.strategy = STRATEGIES[self.mining_config["strategy"]]
        self.inference_steps = default(inference_steps, 5 if use_innerloop_opt else 0)
        self.inference_step_scale = inference_step_scale
        self.inference_step_schedule = inference_step_schedule
        self.answer = answer
        self.sampler_config = sampler or resolve_sampler_config(None)
        # answers live in [-data_bound, data_bound]; 2 on continuous tasks (1 on discrete ones)
        self.data_bound = data_bound
        # the task's corruption (y, mask, fraction, uniforms, kind=) -> negatives' start; None on continuous tasks
        self.corrupt = corrupt
        for name, value in schedule_constants(timesteps).items():
            self.register_buffer(name, value, persistent=False)

    @property
    def runs(self) -> int:
        return self.model.runs

    def _packed(self, v: Tensor) -> Tensor:
        """[B, dim] -> [P, B, dim]: one batch shared by every run of the pack (a view, no copy)."""
        return v.expand(self.runs, *v.shape) if v.dim() == 2 else v

    # -- schedule helpers ------------------------------------------------------------------------
    def at(self, name: str, t: Tensor) -> Tensor:
        """Schedule constant `name` at each sample's level t, [..., 1] to broadcast over an answer."""
        return getattr(self, name)[t].unsqueeze(-1)

    def q_sample(self, y0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return self.at("sqrt_alphas_cumprod", t) * y0 + self.at("sqrt_one_minus_alphas_cumprod", t) * noise

    def x0_from_noise(self, y_t: Tensor, t: Tensor, noise: Tensor | float) -> Tensor:
        return self.at("sqrt_recip_alphas_cumprod", t) * y_t - self.at("sqrt_recipm1_alphas_cumprod", t) * noise

    def condition(self, x: Tensor, t: Tensor) -> Any:
        return self.model.condition(x, t, self.num_timesteps)

    def hold_given(self, y: Tensor, t: Tensor, given: Given | None) -> Tensor:
        """y with its given entries replaced by their value at noise level t, sqrt(abar_t) * value (the
        value noised with zero noise); y unchanged when nothing is given."""
        if given is None:
            return y
        mask, values = given
        return torch.where(mask, self.at("sqrt_alphas_cumprod", t) * values, y)

    # -- inner optimiser, shared by mining and inference --------------------------------------------
    @torch.no_grad()
    def opt_step(
        self,
        cond: Any,
        y: Tensor,
        t: Tensor,
        steps: int,
        scale: float = 1.0,
        schedule: str = "constant",
        clamp_bound: str = "per_sample",
        given: Given | None = None,
    ) -> OptResult:
        """`steps` of gradient descent on the energy with per-sample rejection of energy-raising steps.

        Step i moves by eta_t * scale ('constant'); 'reference' scales steps after the first by data_bound,
        as the published code does (2 on continuous tasks, 1 on discrete ones). Each proposal is clamped to
        data_bound * sqrt(abar_t), with each sample's own t ('per_sample') or, as the published code, the
        first sample's t for the whole batch ('first_sample'). Given entries are held at their value after
        every step.
        """
        bound_t = t if clamp_bound == "per_sample" else t[..., :1]
        bound = self.data_bound * self.at("sqrt_alphas_cumprod", bound_t)
        eta = self.at("opt_step_size", t)
        energy, grad = self.model.energy_and_grad(cond, y)
        energy_start, accepted = energy, []
        for i in range(steps):
            # the published factor of later steps is the clamp bound's: 2 on continuous tasks, 1 on discrete ones
            step_scale = scale if i == 0 or schedule == "constant" else self.data_bound
            proposal = self.hold_given(torch.clamp(y - eta * step_scale * grad, -bound, bound), t, given)
            last = i == steps - 1
            # the energy at the proposal doubles as the next step's starting energy (one pass, not two)
            new_energy, new_grad = self.model.energy_and_grad(cond, proposal, need_grad=not last)
            keep = new_energy <= energy
            y = torch.where(keep, proposal, y)
            energy = torch.where(keep, new_energy, energy)
            if not last:
                grad = torch.where(keep, new_grad, grad)
            accepted.append(keep.flatten(1).float().mean(dim=1))
        return OptResult(y, torch.stack(accepted, dim=-1) if accepted else y.new_zeros(y.shape[0], 0), energy_start, energy)

    # -- training loss -------------------------------------------------------------------------------
    @property
    def starts_from_corruption(self) -> bool:
        """Whether negatives start from the task's corruption of the answer (mining.start: corrupt)."""
        return self.corrupt is not None and self.strategy.mine is not None and self.mining_config["start"] == "corrupt"

    def draw(self, batch: int, generators: Sequence[torch.Generator], device: torch.device | str) -> Draws:
        """A step's random numbers, run by run from each run's generator, always in the order t, eps, eps',
        then the corruption's uniforms (where negatives start from it)."""
        t, noise, noise_pos, uniform = [], [], [], []
        supervised, corrupts = self.strategy.mine is not None, self.starts_from_corruption
        for generator in generators:
            t.append(torch.randint(0, self.num_timesteps, (batch,), device=device, generator=generator))
            noise.append(torch.randn(batch, self.model.out_dim, device=device, generator=generator))
            if supervised:
                noise_pos.append(torch.randn(batch, self.model.out_dim, device=device, generator=generator))
            if corrupts:
                uniform.append(torch.rand(batch, self.model.out_dim, device=device, generator=generator))
        return Draws(torch.stack(t), torch.stack(noise), torch.stack(noise_pos) if supervised else None,
                     torch.stack(uniform) if corrupts else None)

    def forward(
        self,
        x: Tensor,
        y0: Tensor,
        step: int = 0,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        draws: Draws | None = None,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor | float]]:
        """The training loss of a batch ([B, dim] for one run, [P, B, dim] for a pack): the sum over runs of
        each run's mean loss, so backward gives every run its own gradient. Random numbers come from
        `draws` or are drawn from the generator(s), one per run. Statistics are per run ([P], detached),
        but for `energy_grad_evals`, the energy-gradient evaluations per sample this step spent (a float).
        `mask` (bool, like y0; True = given): those entries of every noisy answer are held at their value."""
        x, y0 = self._packed(x), self._packed(y0)
        if draws is None:
            generators = generator if isinstance(generator, Sequence) else [generator] * self.runs
            draws = self.draw(y0.shape[1], generators, y0.device)
        t, noise = draws.t, draws.noise.to(y0.dtype)
        given = None if mask is None else (mask, y0)
        cond = self.condition(x, t)
        _, eps_hat = self.model.energy_and_grad(cond, self.hold_given(self.q_sample(y0, t, noise), t, given))
        error = (eps_hat - noise).pow(2)
        if mask is not None:  # as published: a given entry's prediction is replaced by its target, so it adds 0
            error = error.masked_fill(mask, 0.0)
        loss_denoise = error.mean(dim=-1)  # the mean still over every entry
        stats: dict[str, Tensor | float] = {"loss_denoise": loss_denoise.mean(dim=-1).detach()}
        if self.strategy.mine is None:
            loss = loss_denoise.mean(dim=-1)
            stats.update(loss=loss.detach(), energy_grad_evals=1.0)
            return loss.sum(), stats

        cfg = self.mining_config
        noise_pos = draws.noise_pos.to(y0.dtype)
        y_pos = self.hold_given(self.q_sample(y0, t, noise_pos), t, given)
        corrupted = None
        if self.starts_from_corruption:
            uniform = draws.uniform.to(y0.device)
            corrupted = self.corrupt(y0, mask, cfg["corrupt_fraction"], uniform, kind=cfg["corruption"])
        negatives = self.strategy.mine(self, cond.detach(), y0, t, noise_pos, cfg, step, given, corrupted)
        x0_neg = self.x0_from_noise(negatives.y, t, 0.0).clamp(-self.data_bound, self.data_bound)
        y_neg = self.hold_given(self.q_sample(x0_neg, t, noise_pos), t, given)
        # one pass for both: y stacked as [P, 2, B, D], over which the per-sample condition broadcasts
        energy, _ = self.model.energy_and_grad(cond, torch.stack([y_pos, y_neg], dim=1), need_grad=False)
        energy_pos, energy_neg = energy.squeeze(-1).unbind(1)
        # cross-entropy with the positive as the right class among logits [-E+, -E-]
        loss_energy = F.softplus(energy_pos - energy_neg)
        loss = (loss_denoise + cfg["loss_scale"] * loss_energy).mean(dim=-1)
        stats.update(
            loss=loss.detach(),
            loss_energy=loss_energy.mean(dim=-1).detach(),
            energy_pos=energy_pos.mean(dim=-1).detach(),
            energy_neg=energy_neg.mean(dim=-1).detach(),
            energy_grad_evals=1.0 + negatives.grad_evals,
            **negatives.stats,
        )
        return loss.sum(), stats

    # -- inference -----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        x: Tensor,
        noise: Tensor | None = None,
        inner_steps: int | None = None,
        step_scale: float | None = None,
        generator: torch.Generator | None = None,
        given: Given | None = None,
    ) -> Tensor:
        """Answers [P, B, D] for conditions x ([P, B, dim], or [B, dim] shared by every run): T denoising
        steps, each followed by `inner_steps` of the configured sampler's inner steps (samplers.py). `given`
        entries are held at their value throughout, and the answer has them exactly."""
        return self.sample_with_stats(x, noise, inner_steps, step_scale, generator, given).answer

    @torch.no_grad()
    def sample_with_stats(
        self,
        x: Tensor,
        noise: Tensor | None = None,
        inner_steps: int | None = None,
        step_scale: float | None = None,
        generator: torch.Generator | None = None,
        given: Given | None = None,
        sampler: Mapping[str, Any] | None = None,
    ) -> Sampled:
        """`sample`, keeping the sampler's statistics (e.g. MALA's accept rate); `sampler` (resolved)
        overrides the configured one for this call."""
        x = self._packed(x)
        if noise is None:
            noise = torch.randn(*x.shape[:2], self.model.out_dim, device=x.device, generator=generator)
        return run_sampler(self, x, self._packed(noise), default(inner_steps, self.inference_steps),
                           default(step_scale, self.inference_step_scale), given, generator, sampler)
