"""Negative mining for the contrastive energy loss: one registry, one small function per strategy.

A strategy maps (diffusion, condition, clean answer y0, t, noise eps') to negatives at noise level t.
Adding one is a function plus a `@register(...)` line; nothing else in the library changes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from torch import Tensor

from .models import EnergyCondition
from .utils import brief_repr, suggest

if TYPE_CHECKING:
    from .diffusion import GaussianDiffusion1D


@dataclass(frozen=True)
class Option:
    kind: type
    default: Any
    valid: Callable[[Any], bool]
    requirement: str


@dataclass
class Negatives:
    y: Tensor  # mined negatives at noise level t, before the spec's clamp-and-renoise
    accept_rate: Tensor | None = None  # fraction of inner steps accepted (adversarial only)
    grad_evals: float = 0.0  # energy-gradient evaluations per sample spent mining


MineFn = Callable[["GaussianDiffusion1D", EnergyCondition, Tensor, Tensor, Tensor, dict, int], Negatives]
CostFn = Callable[[dict], float]


@dataclass(frozen=True)
class Strategy:
    mine: MineFn | None  # None: no energy supervision at all
    options: dict[str, Option] = field(default_factory=dict)
    description: str = ""
    cost: CostFn = lambda cfg: 0.0  # expected energy-gradient evaluations per sample per step, for estimates


COMMON_OPTIONS: dict[str, Option] = {
    "opt_steps": Option(int, 2, lambda v: v >= 1, "an int >= 1"),
    "scale_factor": Option(float, 1.0, lambda v: v > 0, "a float > 0"),
    "noise_scale": Option(float, 3.0, lambda v: v > 0, "a float > 0"),
    "loss_scale": Option(float, 0.5, lambda v: v >= 0, "a float >= 0"),
}

STRATEGIES: dict[str, Strategy] = {}


def register(
    name: str, options: dict[str, Option] | None = None, description: str = "", cost: CostFn | None = None
) -> Callable[[MineFn | None], MineFn | None]:
    """Add a strategy: `@register("name", options={...}, description=..., cost=lambda cfg: ...)`."""

    def decorator(fn: MineFn | None) -> MineFn | None:
        STRATEGIES[name] = Strategy(fn, options or {}, description, cost or Strategy.cost)
        return fn

    return decorator


register("none", description="no energy supervision: score loss only")(None)


@register("random", description="the positive's noise scaled by noise_scale")
def mine_random(
    diffusion: GaussianDiffusion1D, cond: EnergyCondition, y0: Tensor, t: Tensor, noise: Tensor, cfg: dict, step: int
) -> Negatives:
    return Negatives(diffusion.q_sample(y0, t, cfg["noise_scale"] * noise))


@register("adversarial", description="random start, then opt_steps of energy descent",
          cost=lambda cfg: cfg["opt_steps"])
def mine_adversarial(
    diffusion: GaussianDiffusion1D, cond: EnergyCondition, y0: Tensor, t: Tensor, noise: Tensor, cfg: dict, step: int
) -> Negatives:
    start = mine_random(diffusion, cond, y0, t, noise, cfg, step).y
    y, accept_rate = diffusion.opt_step(cond, start, t, steps=cfg["opt_steps"], scale=cfg["scale_factor"])
    return Negatives(y, accept_rate, grad_evals=float(cfg["opt_steps"]))


@register(
    "periodic",
    options={"every": Option(int, 4, lambda v: v >= 1, "an int >= 1")},
    description="adversarial on steps divisible by `every`, random otherwise",
    cost=lambda cfg: cfg["opt_steps"] / cfg["every"],
)
def mine_periodic(
    diffusion: GaussianDiffusion1D, cond: EnergyCondition, y0: Tensor, t: Tensor, noise: Tensor, cfg: dict, step: int
) -> Negatives:
    mine = mine_adversarial if step % cfg["every"] == 0 else mine_random
    return mine(diffusion, cond, y0, t, noise, cfg, step)


@register(
    "mixed",
    options={"fraction": Option(float, 0.5, lambda v: 0 <= v <= 1, "a float in [0, 1]")},
    description="a `fraction` of each batch adversarial, the rest random",
    cost=lambda cfg: cfg["opt_steps"] * cfg["fraction"],
)
def mine_mixed(
    diffusion: GaussianDiffusion1D, cond: EnergyCondition, y0: Tensor, t: Tensor, noise: Tensor, cfg: dict, step: int
) -> Negatives:
    negatives = mine_random(diffusion, cond, y0, t, noise, cfg, step)
    k = round(cfg["fraction"] * y0.shape[0])
    if k == 0:
        return negatives
    head = slice(0, k)  # samples are i.i.d., so the first k are as good a subset as any
    mined = mine_adversarial(diffusion, cond.select(head), y0[head], t[head], noise[head], cfg, step)
    y = negatives.y.clone()
    y[head] = mined.y
    return Negatives(y, mined.accept_rate, grad_evals=mined.grad_evals * k / y0.shape[0])


def _check_option(name: str, option: Option, value: Any) -> Any:
    ok_type = isinstance(value, option.kind) and not isinstance(value, bool)
    if option.kind is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value, ok_type = float(value), True
        except OverflowError:  # an int beyond any float
            value, ok_type = math.inf, True
    if ok_type and option.kind is float and not math.isfinite(value):  # inf and nan pass `v > 0` checks
        raise ValueError(f"mining_config['{name}'] = {value} is invalid: must be a finite number")
    if not ok_type or not option.valid(value):
        raise ValueError(f"mining_config['{name}'] = {brief_repr(value)} is invalid: must be {option.requirement}")
    return value


def resolve_mining_config(
    mining_config: Mapping[str, Any] | None = None, supervise_energy_landscape: bool = True
) -> dict[str, Any]:
    """Validate a mining_config and fill in defaults; None derives it from the reference flag.

    Raises ValueError naming the bad key or value and listing what is allowed.
    """
    if mining_config is None:
        mining_config = {"strategy": "adversarial" if supervise_energy_landscape else "none"}
    if not isinstance(mining_config, Mapping):
        raise ValueError(f"mining_config must be a dict, got {type(mining_config).__name__}")
    name = mining_config.get("strategy", "adversarial")
    if name not in STRATEGIES:
        raise ValueError(
            f"mining_config['strategy'] = {name!r} is unknown{suggest(str(name), list(STRATEGIES))}; "
            f"allowed: {', '.join(STRATEGIES)}"
        )
    options = {**COMMON_OPTIONS, **STRATEGIES[name].options}
    resolved: dict[str, Any] = {"strategy": name}
    for key, value in mining_config.items():
        if key == "strategy":
            continue
        if key not in options:
            allowed = ["strategy", *options]
            raise ValueError(
                f"mining_config has unknown key '{key}' for strategy '{name}'{suggest(key, allowed)}; "
                f"allowed: {', '.join(allowed)}"
            )
        resolved[key] = _check_option(key, options[key], value)
    for key, option in options.items():
        resolved.setdefault(key, option.default)
    return resolved


def mining_strategy(mining_config: Mapping[str, Any]) -> Strategy:
    return STRATEGIES[mining_config["strategy"]]
