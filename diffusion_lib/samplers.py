"""Samplers: how answers are drawn from a trained energy diffusion. One registry, one small function each.

Every sampler walks the T diffusion levels as the spec's inference does (predict x0 from the denoiser,
scale it to the level, refine it with `inner_steps` steps on the level's energy, clamp, re-scale to the
next level); they differ only in the inner steps:
- `ired` (default): the spec's descent with per-sample rejection of energy-raising steps (`opt_step`),
  the numbers this project has always produced;
- `langevin`: unadjusted Langevin steps y - h grad E + sqrt(2 h tau) xi, h = eta_t * step_scale, with a
  temperature tau (0: plain gradient descent, no rejection) and its schedule over a level's inner steps;
- `mala`: the same proposal, accepted by Metropolis-Hastings for the density exp(-E / tau) on the clamp
  box (a proposal outside it is rejected); its accept rate is returned.
A sampler is fn(diffusion, x, noise, inner_steps, step_scale, given, generator, cfg) -> Sampled, with x
and noise packed [P, B, ...]; `generator` draws a noisy sampler's numbers, [B, ...] shared by the runs of
a pack, so a run samples the same alone or packed; `given` holds known entries (diffusion.hold_given,
contract section 4) and is None on tasks without them.

Like mining.py, this module imports no torch at load time (the config lists the sampler names quickly).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from diffusion_lib.registry import Option, Registry, one_of

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from diffusion_lib.diffusion import GaussianDiffusion1D
    InnerFn = Callable[[Any, Tensor, Tensor, int], Tensor]  # (condition, y, t, level) -> y


@dataclass
class Sampled:
    answer: Tensor  # [P, B, D]
    stats: dict[str, Tensor] = field(default_factory=dict)  # per run, e.g. MALA's accept rate [P]


SampleFn = Callable[..., Sampled]


@dataclass(frozen=True)
class Sampler:
    sample: SampleFn
    options: dict[str, Option] = field(default_factory=dict)
    description: str = ""


SAMPLERS: Registry[Sampler] = Registry("sampler", "name", "ired", "sampler", label="sampler")
ANSWERS = ("x0", "scaled")  # what the walk returns: x0, or the published sqrt(abar_0) x0


def register_sampler(
    name: str, options: dict[str, Option] | None = None, description: str = ""
) -> Callable[[SampleFn], SampleFn]:
    """Add a sampler: `@register_sampler("name", options={...}, description=...)`."""

    def decorator(fn: SampleFn) -> SampleFn:
        SAMPLERS.register(name, Sampler(fn, options or {}, description))
        return fn

    return decorator


def resolve_sampler_config(sampler: str | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """{'name': ..., **options} with defaults filled in, from a name or a map; ValueError in one line."""
    config = {"name": "ired"} if sampler is None else {"name": sampler} if isinstance(sampler, str) else sampler
    if not isinstance(config, Mapping):
        raise ValueError(f"a sampler is a name or a map {{name: ..., <options>}}, not {type(config).__name__}")
    return SAMPLERS.resolve(config)


def sampler_label(config: Mapping[str, Any]) -> str:
    """'langevin' for a sampler with its default options, else 'langevin(temperature=0.5)' (names results)."""
    defaults = resolve_sampler_config(config["name"])
    changed = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items() if defaults.get(k) != v]
    return config["name"] + (f"({', '.join(changed)})" if changed else "")


def run_sampler(
    diffusion: GaussianDiffusion1D,
    x: Tensor,
    noise: Tensor,
    inner_steps: int,
    step_scale: float,
    given: Any = None,
    generator: torch.Generator | None = None,
    sampler_config: Mapping[str, Any] | None = None,
) -> Sampled:
    """Answers for packed conditions x [P, B, inp] from start noise [P, B, D] with the resolved
    `sampler_config` (default: the diffusion's own)."""
    cfg = diffusion.sampler_config if sampler_config is None else sampler_config
    return SAMPLERS[cfg["name"]].sample(diffusion, x, noise, inner_steps, step_scale, given, generator, cfg)


def sampling_flops(diffusion: GaussianDiffusion1D, x: Tensor, noise: Tensor, inner_steps: int, step_scale: float,
                   given: Any = None, generator: torch.Generator | None = None,
                   sampler_config: Mapping[str, Any] | None = None) -> float:
    """Matmul FLOPs per answer of one sampling pass, counted (FlopCounterMode) as the trainer counts a
    training step's; x and noise packed [P, B, ...], the count divided by P * B."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run_sampler(diffusion, x, noise, inner_steps, step_scale, given, generator, sampler_config)
    return counter.get_total_flops() / (x.shape[0] * x.shape[1])


# -- the shared walk over the diffusion levels -----------------------------------------------------------
def walk_levels(diffusion: GaussianDiffusion1D, x: Tensor, noise: Tensor, given: Any, inner: InnerFn | None) -> Tensor:
    """The spec's inference with `inner(cond, y, t, level)` as each level's refinement (None: none)."""
    import torch

    bound = diffusion.data_bound
    runs, batch = x.shape[:2]
    y = noise.to(x.dtype)
    t = torch.empty(runs, batch, dtype=torch.long, device=x.device)
    for step in reversed(range(diffusion.num_timesteps)):
        t.fill_(step)
        y = diffusion.hold_given(y, t, given)  # the start noise, and each level's re-scaled answer
        cond = diffusion.condition(x, t)
        _, eps_hat = diffusion.model.energy_and_grad(cond, y)
        x0 = diffusion.x0_from_noise(y, t, eps_hat).clamp(-bound, bound)
        scale_t = diffusion.sqrt_alphas_cumprod[step]
        y = diffusion.hold_given(scale_t * x0, t, given)
        if inner is not None:
            y = inner(cond, y, t, step)
        y = y.clamp(-bound * scale_t, bound * scale_t)
        x0 = y / scale_t if given is None else torch.where(given[0], given[1], y / scale_t)  # given: exact
        if step > 0:
            y = diffusion.sqrt_alphas_cumprod[step - 1] * x0
    return x0 * diffusion.sqrt_alphas_cumprod[0] if diffusion.answer == "scaled" else x0


def _box(diffusion: GaussianDiffusion1D, t: Tensor) -> tuple[Tensor, Tensor]:
    """Each sample's inner step h = eta_t (times step_scale by the caller) and clamp bound, [P, B, 1]."""
    return diffusion.at("opt_step_size", t), diffusion.data_bound * diffusion.at("sqrt_alphas_cumprod", t)


def _normal(y: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normals [B, D] shared by every run of the pack (so a run draws the same alone or packed)."""
    import torch

    return torch.randn(y.shape[1:], generator=generator, device=y.device, dtype=y.dtype)


# -- the samplers ----------------------------------------------------------------------------------------
@register_sampler("ired", description="the spec's sampler: inner descent with per-sample rejection (opt_step)")
def sample_ired(diffusion: GaussianDiffusion1D, x: Tensor, noise: Tensor, inner_steps: int, step_scale: float,
                given: Any, generator: torch.Generator | None, cfg: dict) -> Sampled:
    def descend(cond: Any, y: Tensor, t: Tensor, level: int) -> Tensor:
        return diffusion.opt_step(cond, y, t, inner_steps, step_scale, diffusion.inference_step_schedule, given=given).y

    return Sampled(walk_levels(diffusion, x, noise, given, descend if inner_steps > 0 else None))


TEMPERATURE_SCHEDULES: dict[str, Callable[[int, int], float]] = {
    "constant": lambda k, steps: 1.0,
    "linear": lambda k, steps: (steps - k) / steps,  # from tau at a level's first inner step to tau / steps
}
SCHEDULE_OPTION = one_of(*TEMPERATURE_SCHEDULES)


@register_sampler(
    "langevin",
    options={
        "temperature": Option(float, 1.0, lambda v: v >= 0, "a float >= 0"),
        "temperature_schedule": SCHEDULE_OPTION,
    },
    description="unadjusted Langevin inner steps: y - h grad E + sqrt(2 h tau) xi, no rejection",
)
def sample_langevin(diffusion: GaussianDiffusion1D, x: Tensor, noise: Tensor, inner_steps: int, step_scale: float,
                    given: Any, generator: torch.Generator | None, cfg: dict) -> Sampled:
    schedule = TEMPERATURE_SCHEDULES[cfg["temperature_schedule"]]

    def langevin(cond: Any, y: Tensor, t: Tensor, level: int) -> Tensor:
        eta, bound = _box(diffusion, t)
        h = eta * step_scale
        for k in range(inner_steps):
            _, grad = diffusion.model.energy_and_grad(cond, y)
            y = y - h * grad
            tau = cfg["temperature"] * schedule(k, inner_steps)
            if tau > 0:  # tau = 0 is plain descent and draws nothing
                y = y + (2 * h * tau).sqrt() * _normal(y, generator)
            y = diffusion.hold_given(y.clamp(-bound, bound), t, given)
        return y

    return Sampled(walk_levels(diffusion, x, noise, given, langevin if inner_steps > 0 else None))


@register_sampler(
    "mala",
    options={"temperature": Option(float, 1.0, lambda v: v > 0, "a float > 0")},
    description="Metropolis-adjusted Langevin inner steps for exp(-E / tau) on the clamp box",
)
def sample_mala(diffusion: GaussianDiffusion1D, x: Tensor, noise: Tensor, inner_steps: int, step_scale: float,
                given: Any, generator: torch.Generator | None, cfg: dict) -> Sampled:
    accepted: list[Tensor] = []  # [P] per inner step, all levels

    def mala(cond: Any, y: Tensor, t: Tensor, level: int) -> Tensor:
        eta, bound = _box(diffusion, t)
        h, tau = eta * step_scale, cfg["temperature"]
        free = None if given is None else ~given[0]  # the proposal moves only the entries not given
        energy, grad = diffusion.model.energy_and_grad(cond, y)
        for _ in range(inner_steps):
            proposal = diffusion.hold_given(y - h * grad + (2 * h * tau).sqrt() * _normal(y, generator), t, given)
            new_energy, new_grad = diffusion.model.energy_and_grad(cond, proposal)
            log_ratio = _mala_log_ratio(y, proposal, grad, new_grad, energy, new_energy, h, tau, free)
            inside = (proposal.abs() <= bound).all(dim=-1, keepdim=True)
            keep = inside & (_uniform(log_ratio, generator).log() < log_ratio)
            y, energy, grad = (a.where(keep, b) for a, b in ((proposal, y), (new_energy, energy), (new_grad, grad)))
            accepted.append(keep.flatten(1).float().mean(dim=1))
        return y

    answer = walk_levels(diffusion, x, noise, given, mala if inner_steps > 0 else None)
    rates = _stack(accepted, answer)
    return Sampled(answer, {"accept_rate": rates.mean(dim=-1), "accept_rate_steps": rates})


def _mala_log_ratio(y: Tensor, proposal: Tensor, grad: Tensor, new_grad: Tensor, energy: Tensor,
                    new_energy: Tensor, h: Tensor, tau: float, free: Tensor | None) -> Tensor:
    """log of pi(y') q(y | y') / (pi(y) q(y' | y)) for pi = exp(-E / tau) and the Gaussian proposal
    q(y' | y) = N(y - h grad E(y), 2 h tau I), over the entries that move, [P, B, 1]."""
    forward = proposal - (y - h * grad)
    backward = y - (proposal - h * new_grad)
    if free is not None:
        forward, backward = forward * free, backward * free
    log_q = (forward.pow(2) - backward.pow(2)).sum(dim=-1, keepdim=True) / (4 * h * tau)
    return (energy - new_energy) / tau + log_q


def _uniform(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Uniforms in [0, 1) for one sample of every run, [B, 1], shared by the pack as `_normal`'s are."""
    import torch

    return torch.rand(like.shape[1:], generator=generator, device=like.device, dtype=like.dtype)


def _stack(rows: list[Tensor], like: Tensor) -> Tensor:
    """[P, steps] from per-step [P] rows; [P, 0] when there were none (no inner steps)."""
    import torch

    return torch.stack(rows, dim=-1) if rows else like.new_zeros(like.shape[0], 0)
