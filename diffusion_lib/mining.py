"""Negative mining for the contrastive energy loss: one registry, one small function per strategy.

A strategy maps (diffusion, condition, clean answer y0, t, noise eps') to negatives at noise level t.
On a task with a corruption of its answers (the discrete tasks), `start: corrupt` (the default) hands
each strategy the corrupted answer too: `random` is then that corruption (the published code's
negatives) and `adversarial` descends from it; `start: noise` (and every task without a corruption)
starts from q_sample(y0, t, noise_scale eps').
Adding one is a function plus a `@register(...)` line; nothing else in the library changes.
Tensors are packed [P, B, ...] (see models.py); statistics are per run.

This module imports no torch at load time, so the command-line help can list the strategies quickly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from diffusion_lib.registry import Option, Registry, one_of

if TYPE_CHECKING:
    from torch import Tensor

    from diffusion_lib.diffusion import GaussianDiffusion1D, Given, OptResult


@dataclass
class Negatives:
    y: Tensor  # mined negatives at noise level t, before the spec's clamp-and-renoise
    stats: dict[str, Tensor] = field(default_factory=dict)  # per-run mining statistics (see `descent_stats`)
    grad_evals: float = 0.0  # energy-gradient evaluations per sample spent mining


# (diffusion, condition, y0, t, eps', mining config, step, given entries or None, the task's corruption of y0
# or None) -> negatives; a strategy holds the given entries of what it forms (diffusion.hold_given;
# opt_step(..., given=given) does it per step)
MineFn = Callable[["GaussianDiffusion1D", Any, "Tensor", "Tensor", "Tensor", dict, int, "Given | None", "Tensor | None"], Negatives]


@dataclass(frozen=True)
class Strategy:
    mine: MineFn | None  # None: no energy supervision at all
    options: dict[str, Option] = field(default_factory=dict)
    description: str = ""
    # steps after which the strategy's work repeats (a step's FLOPs are measured as the mean over one period)
    period: Callable[[dict], int] = lambda cfg: 1


# inner descent steps: eta_t * scale each, or the published rule (later steps x the clamp factor: 2, discrete 1)
STEP_SCHEDULES = ("constant", "reference")


COMMON_OPTIONS: dict[str, Option] = {
    # at most 1000: inner descent steps per negative, on every training step (more is a typo)
    "opt_steps": Option(int, 2, lambda v: 1 <= v <= 1000, "an int >= 1, at most 1000"),
    "scale_factor": Option(float, 1.0, lambda v: v > 0, "a float > 0"),
    "noise_scale": Option(float, 3.0, lambda v: v > 0, "a float > 0"),
    "loss_scale": Option(float, 0.5, lambda v: v >= 0, "a float >= 0"),
    # discrete tasks: the negatives' start (the task's corruption of the answer, or noise as on continuous
    # tasks) and the share of entries the corruption hits (the published code's 0.05)
    "start": one_of("corrupt", "noise"),
    "corrupt_fraction": Option(float, 0.05, lambda v: 0 <= v <= 1, "a float in [0, 1]"),
    # the published corruption (a re-draw may give the same value back) or a clean one (every hit changes
    # its entry and every negative differs from the positive): the task's corrupt(..., kind=)
    "corruption": one_of("published", "clean"),
    # the published code's mining quirks, on request (README: "Where the published code differs")
    "step_schedule": one_of(*STEP_SCHEDULES),
    "clamp_bound": one_of("per_sample", "first_sample"),
}

STRATEGIES: Registry[Strategy] = Registry("mining_config", "strategy", "adversarial", "strategy", COMMON_OPTIONS)


def register(
    name: str,
    options: dict[str, Option] | None = None,
    description: str = "",
    period: Callable[[dict], int] | None = None,
) -> Callable[[MineFn | None], MineFn | None]:
    """Add a strategy: `@register("name", options={...}, description=...)`; `period`: for a strategy whose
    work changes from step to step, after how many steps it repeats (its FLOPs are measured over one)."""

    def decorator(fn: MineFn | None) -> MineFn | None:
        STRATEGIES.register(name, Strategy(fn, options or {}, description, period or Strategy.period))
        return fn

    return decorator


def descent_stats(start: Tensor, result: OptResult) -> dict[str, Tensor]:
    """What a descent did, per run: accept rate of each inner step, energy decrease, RMS distance moved."""
    moved = (result.y - start).pow(2).mean(dim=-1).sqrt()  # ||y - y0|| / sqrt(d), per sample
    return {
        "accept_rate": result.accepted.mean(dim=-1),
        "accept_rate_steps": result.accepted,
        "energy_decrease": (result.energy_start - result.energy).squeeze(-1).mean(dim=-1),
        "move_rms": moved.mean(dim=-1),
    }


register("none", description="no energy supervision: score loss only")(None)


@register("random", description="the positive's noise scaled by noise_scale, or the task's corruption")
def mine_random(
    diffusion: GaussianDiffusion1D, cond: Any, y0: Tensor, t: Tensor, noise: Tensor, cfg: dict, step: int,
    given: Given | None = None, corrupted: Tensor | None = None,
) -> Negatives:
    if corrupted is None:
        return Negatives(diffusion.hold_given(diffusion.q_sample(y0, t, cfg["noise_scale"] * noise), t, given))
    # the corrupted answer at level t with zero noise: the loss's renoising with eps' then gives
    # q_sample(corrupted, t, eps'), the published code's negative
    return Negatives(diffusion.hold_given(diffusion.q_sample(corrupted, t, 0.0), t, given))


@register("adversarial", description="random start, then opt_steps of energy descent")
def mine_adversarial(
    diffusion: GaussianDiffusion1D, cond: Any, y0: Tensor, t: Tensor, noise: Tensor, cfg: dict, step: int,
    given: Given | None = None, corrupted: Tensor | None = None,
) -> Negatives:
    # from a corruption the start is sqrt(abar_t) * corrupted: a noise-free answer at level t inside the clamp
    # bound, where the sampler's inner steps work too; the loss then renoises the result with eps'
    start = mine_random(diffusion, cond, y0, t, noise, cfg, step, given, corrupted).y
    result = diffusion.opt_step(cond, start, t, steps=cfg["opt_steps"], scale=cfg["scale_factor"],
                                schedule=cfg["step_schedule"], clamp_bound=cfg["clamp_bound"], given=given)
    return Negatives(result.y, descent_stats(start, result), grad_evals=float(cfg["opt_steps"]))


@register(
    "periodic",
    options={"every": Option(int, 4, lambda v: v >= 1, "an int >= 1")},
    description="adversarial on steps divisible by `every`, random otherwise",
    period=lambda cfg: cfg["every"],
)
def mine_periodic(
    diffusion: GaussianDiffusion1D, cond: Any, y0: Tensor, t: Tensor, noise: Tensor, cfg: dict, step: int,
    given: Given | None = None, corrupted: Tensor | None = None,
) -> Negatives:
    mine = mine_adversarial if step % cfg["every"] == 0 else mine_random
    return mine(diffusion, cond, y0, t, noise, cfg, step, given, corrupted)


@register(
    "mixed",
    options={"fraction": Option(float, 0.5, lambda v: 0 <= v <= 1, "a float in [0, 1]")},
    description="a `fraction` of each batch adversarial, the rest random",
)
def mine_mixed(
    diffusion: GaussianDiffusion1D, cond: Any, y0: Tensor, t: Tensor, noise: Tensor, cfg: dict, step: int,
    given: Given | None = None, corrupted: Tensor | None = None,
) -> Negatives:
    negatives = mine_random(diffusion, cond, y0, t, noise, cfg, step, given, corrupted)
    batch = y0.shape[1]
    k = round(cfg["fraction"] * batch)
    if k == 0:
        return negatives
    head = slice(0, k)  # samples are i.i.d., so the first k are as good a subset as any
    head_given = None if given is None else (given[0][:, head], given[1][:, head])
    head_corrupted = None if corrupted is None else corrupted[:, head]
    mined = mine_adversarial(diffusion, cond.select(head), y0[:, head], t[:, head], noise[:, head], cfg, step,
                             head_given, head_corrupted)
    y = negatives.y.clone()
    y[:, head] = mined.y
    return Negatives(y, mined.stats, grad_evals=mined.grad_evals * k / batch)


def resolve_mining_config(
    mining_config: Mapping[str, Any] | None = None, supervise_energy_landscape: bool = True
) -> dict[str, Any]:
    """`mining_config` validated, defaults filled in (ValueError in one line); None: from the reference flag."""
    if mining_config is None:
        mining_config = {"strategy": "adversarial" if supervise_energy_landscape else "none"}
    return STRATEGIES.resolve(mining_config)
