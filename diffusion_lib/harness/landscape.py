"""The energy landscape measured where it is used: energy as a verifier, and best-of-N selection.

Numbers only (the trainer and the report decide where they go). Everything works on packed models:
conditions x [P, B, inp] (or [B, inp] shared by every run), answers [P, B, D]; results are per run and per
problem ([P, ..., B]), so shards of a held-out set sum and then divide. Random numbers are passed in as
tensors made for the whole set (`fixed_noise`), so every strategy, seed and shard sees the same ones.

- `rank_true_answers`: at each diffusion level, is the true answer's energy below that of a perturbed one
  (answer + sigma * noise for a few sigma; any named candidates, e.g. the model's own samples)? The
  fraction of pairs ranked right (ties count half): 1 is a perfect verifier, 0.5 a blind one.
- `best_of_n`: N samples per problem from N start noises; the error of the lowest-energy pick against a
  random pick and the oracle best of the N, for nested N (the first 4 of the 16); `best_of_flops` gives its
  FLOPs per answer so that more samples and more inner steps can be compared at equal compute.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from diffusion_lib.diffusion import GaussianDiffusion1D
from diffusion_lib.samplers import run_sampler

VIEWS = ("sampling", "training")

# (x [P, B, inp], candidate answers [P, N, B, D]) -> a score per candidate [P, N, B], lower = preferred
Verifier = Callable[[Tensor, Tensor], Tensor]
# answers [P, B, D] -> metric name -> per-problem values [P, B] (a task's score on one held-out set)
Score = Callable[[Tensor], Mapping[str, Tensor]]


def fixed_noise(count: int, problems: int, dim: int, seed: int) -> Tensor:
    """[count, problems, dim] standard normals from `seed` alone, on the CPU (like the held-out noise)."""
    return torch.randn(count, problems, dim, generator=torch.Generator().manual_seed(seed))


# -- energy as a verifier -----------------------------------------------------------------------------------
@dataclass
class Ranking:
    distances: list[str]  # "sigma_0.1", ..., then the names of the candidates passed in
    levels: list[int]
    correct: Tensor  # [P, distances, levels, B]: 1 ranked right (true answer lower), 0 wrong, 0.5 tie

    def fraction(self) -> Tensor:
        """[P, distances, levels]: the fraction of pairs ranked right."""
        return self.correct.mean(dim=-1)

    def table(self, run: int) -> dict[str, dict[str, float]]:
        """One run's fractions as {distance: {level: value}} (JSON-ready)."""
        values = self.fraction()[run].tolist()
        return {d: {str(t): v for t, v in zip(self.levels, row)} for d, row in zip(self.distances, values)}


def energy_at(diffusion: GaussianDiffusion1D, x: Tensor, answers: Tensor, level: int,
              renoise: Tensor | None = None, given: Any = None) -> Tensor:
    """Energies [P, k, B] of answers [P, k, B, D] at `level`, seen as the sampler's inner steps see them,
    sqrt(abar_t) * answer, or (renoise = the shared eps, [B, D]) as training's contrastive loss does,
    q_sample(answer, t, eps)."""
    x = diffusion._packed(x)
    t = torch.full(x.shape[:2], level, dtype=torch.long, device=x.device)
    t_k = t.unsqueeze(1).expand(answers.shape[:3])
    y = diffusion.sqrt_alphas_cumprod[level] * answers if renoise is None else diffusion.q_sample(answers, t_k, renoise)
    if given is not None:  # candidate by candidate: hold_given takes [P, B, D] (contract section 4)
        y = torch.stack([diffusion.hold_given(c, t, given) for c in y.unbind(1)], dim=1)
    energy, _ = diffusion.model.energy_and_grad(diffusion.condition(x, t), y, need_grad=False)
    return energy.squeeze(-1)


@torch.no_grad()
def rank_true_answers(
    diffusion: GaussianDiffusion1D,
    x: Tensor,
    y: Tensor,
    scales: Sequence[float],
    directions: Tensor,
    *,
    candidates: dict[str, Tensor] | None = None,
    levels: Sequence[int] | None = None,
    view: str = "sampling",
    renoise: Tensor | None = None,
    given: Any = None,
) -> Ranking:
    """How often the energy ranks the true answer y ([B, D] or [P, B, D]) below a perturbed one.

    Perturbed answers: y + scales[i] * directions[i] (directions [len(scales), B, D], e.g. `fixed_noise`),
    and each named candidate [P, B, D] (e.g. {"samples": the model's answers}); levels default to all.
    view 'sampling': answers scaled to the level as the inner steps see them; 'training': noised with the
    shared eps `renoise` [B, D], as the contrastive loss sees its positive and negatives.
    """
    if view not in VIEWS or (view == "training") != (renoise is not None):
        raise ValueError(f"view = {view!r}: must be one of {VIEWS}; 'training' (only) needs renoise")
    if directions.shape[0] != len(scales):
        raise ValueError(f"directions has {directions.shape[0]} rows for {len(scales)} scales")
    x = diffusion._packed(x)
    y = diffusion._packed(y.to(x.dtype))
    others = [y + sigma * d.to(y) for sigma, d in zip(scales, directions)]
    names = [f"sigma_{sigma:g}" for sigma in scales]
    for name, answer in (candidates or {}).items():
        others.append(diffusion._packed(answer.to(x.dtype)))
        names.append(name)
    stacked = torch.stack([y, *others], dim=1)  # [P, 1 + S, B, D]: one energy pass per level
    levels = list(range(diffusion.num_timesteps)) if levels is None else list(levels)
    correct = []
    for level in levels:
        energy = energy_at(diffusion, x, stacked, level, renoise, given)
        true, other = energy[:, :1], energy[:, 1:]
        correct.append((true < other).to(x.dtype) + 0.5 * (true == other).to(x.dtype))
    return Ranking(names, levels, torch.stack(correct, dim=2))


# -- best-of-N ---------------------------------------------------------------------------------------------
@dataclass
class BestOfN:
    n: int
    energy_pick: dict[str, Tensor]  # metric -> [P, B]: of the candidate the verifier prefers among the first n
    random_pick: dict[str, Tensor]  # metric -> [P, B]: expected value of a uniformly random pick (the mean over n)
    oracle: dict[str, Tensor]  # metric -> [P, B]: of the best of the n


def model_energy(diffusion: GaussianDiffusion1D) -> Verifier:
    """The model's own verdict: energy at level 0, on the answer as the last inner steps descended it."""
    # a 'scaled' answer is sqrt(abar_0) x0 already: score the x0 it stands for
    unscale = diffusion.sqrt_alphas_cumprod[0] if diffusion.answer == "scaled" else 1.0
    return lambda x, answers: energy_at(diffusion, x, answers / unscale, 0)


@torch.no_grad()
def best_of_n(
    diffusion: GaussianDiffusion1D,
    x: Tensor,
    noises: Tensor,
    score: Score,
    higher_is_better: Mapping[str, bool],
    ns: Sequence[int] = (1, 4, 16),
    *,
    verifier: Verifier | None = None,
    inner_steps: int | None = None,
    step_scale: float | None = None,
    given: Any = None,
    generator: torch.Generator | None = None,
    sampler: Any = None,
) -> list[BestOfN]:
    """Per n in `ns`, for each metric `score` gives: the value of the verifier's pick (default: the model's
    energy), of a random pick and of the oracle among the first n of the candidates sampled from `noises`
    [N, B, D] (N = max(ns); noises[0] is the set's own start noise and the generator is drawn from in
    candidate order, so n = 1 is plain sampling)."""
    if not ns or min(ns) < 1 or max(ns) > noises.shape[0]:
        raise ValueError(f"ns = {list(ns)}: each must be in [1, {noises.shape[0]}] (the noises given)")
    x = diffusion._packed(x)
    inner_steps = diffusion.inference_steps if inner_steps is None else inner_steps
    step_scale = diffusion.inference_step_scale if step_scale is None else step_scale
    verifier = verifier or model_energy(diffusion)
    answers = [run_sampler(diffusion, x, diffusion._packed(noise.to(x)), inner_steps, step_scale, given, generator,
                           sampler).answer for noise in noises[: max(ns)]]
    scores = verifier(x, torch.stack(answers, dim=1))  # [P, N, B]
    per_answer = [score(a) for a in answers]
    values = {m: torch.stack([v[m] for v in per_answer], dim=1) for m in per_answer[0]}  # metric -> [P, N, B]
    results = []
    for n in ns:
        pick = scores[:, :n].argmin(dim=1, keepdim=True)
        best = {m: v[:, :n].amax(dim=1) if higher_is_better[m] else v[:, :n].amin(dim=1) for m, v in values.items()}
        results.append(BestOfN(
            n=n,
            energy_pick={m: v[:, :n].gather(1, pick.to(v.device)).squeeze(1) for m, v in values.items()},
            random_pick={m: v[:, :n].mean(dim=1) for m, v in values.items()},
            oracle=best,
        ))
    return results


def verifier_flops(diffusion: GaussianDiffusion1D, x: Tensor, candidates: int, verifier: Verifier | None = None) -> float:
    """Matmul FLOPs of scoring one candidate answer when `candidates` are scored per problem, counted on
    stand-in answers (the count depends on shapes only); x packed [P, B, inp]."""
    x = diffusion._packed(x)
    stand_in = x.new_zeros(x.shape[0], candidates, x.shape[1], diffusion.model.out_dim)
    with FlopCounterMode(display=False) as counter:
        (verifier or model_energy(diffusion))(x, stand_in)
    return counter.get_total_flops() / stand_in.shape[:3].numel()


def best_of_flops(n: int, sample_flops: float, verify_flops: float) -> float:
    """FLOPs per answer of best-of-n: n samples, and scoring the n candidates when there is a choice."""
    return n * sample_flops + (n * verify_flops if n > 1 else 0.0)
