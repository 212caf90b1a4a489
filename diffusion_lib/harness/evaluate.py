"""Scoring: a packed model's held-out scores, and its energy landscape measured where it is used.

`Evaluator` scores the EMA and the raw weights on the task's held-out sets as eval.* says: validation
during training, the final scoring (inner-step sweep, extra samplers, ranking, best-of-N, FLOPs per answer)
and `train.py --evaluate` (`evaluate_saved`, from a checkpoint, with no trainer). Each process scores its
own slice of every set; the per-run sums are reduced across processes and divided by the set's size.

The measures it uses (first below) are numbers only. Everything works on packed models: conditions x [P, B, inp] (or
[B, inp] shared by every run), answers [P, B, D]; results are per run and per problem ([P, ..., B]), so
shards of a held-out set sum and then divide. Random numbers are passed in as tensors made for the whole
set (`fixed_noise`), so every strategy, seed and shard sees the same ones.

- `rank_true_answers`: at each diffusion level, is the true answer's energy below that of a perturbed one
  (answer + sigma * noise for a few sigma; any named candidates, e.g. the model's own samples)? The
  fraction of pairs ranked right (ties count half): 1 is a perfect verifier, 0.5 a blind one.
- `best_of_n`: N samples per problem from N start noises; the error of the lowest-energy pick against a
  random pick and the oracle best of the N, for nested N (the first 4 of the 16); `best_of_flops` gives its
  FLOPs per answer so that more samples and more inner steps can be compared at equal compute.
"""
from __future__ import annotations

import copy
import dataclasses
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from accelerate import Accelerator
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from diffusion_lib.diffusion import GaussianDiffusion1D
from diffusion_lib.harness.checkpoint import load_latest_checkpoint, load_run_state_dict
from diffusion_lib.harness.config import ConfigError, RunConfig
from diffusion_lib.harness.io import bar_rate
from diffusion_lib.harness.run_dir import EVALUATION_CHANGES, RunDir, code_version
from diffusion_lib.samplers import run_sampler, sampler_label, sampling_flops
from diffusion_lib.tasks.base import HeldOutSet, Task, mix_seed

VIEWS = ("sampling", "training")
# model.dtype -> the dtype of weights and data (bfloat16 is mixed precision: float32 weights, bf16 autocast)
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.float32}
FLOP_PROBLEMS = 64  # problems a sampling pass's FLOPs per answer are counted on
# A sampling pass's FLOPs depend on shapes only (the task, model and diffusion settings, the sampler, the inner
# steps, the problems counted on): counted once per process, since FlopCounterMode's op-by-op dispatch costs
# a quick-study run a tenth of its scoring, and a study's runs share them.
SAMPLING_FLOPS: dict[tuple, float] = {}

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
    [N, B, D] (N = max(ns)). noises[0] is the set's own start noise, sampled first and alone, so n = 1 is
    plain sampling; the other N - 1 candidates are sampled as one batch (one walk of the levels with larger
    matmuls instead of N - 1), each from its own noise. A noisy sampler draws their numbers from the
    generator as one batch too, so they are not those of N - 1 passes in turn."""
    if not ns or min(ns) < 1 or max(ns) > noises.shape[0]:
        raise ValueError(f"ns = {list(ns)}: each must be in [1, {noises.shape[0]}] (the noises given)")
    x = diffusion._packed(x)
    inner_steps = diffusion.inference_steps if inner_steps is None else inner_steps
    step_scale = diffusion.inference_step_scale if step_scale is None else step_scale
    verifier = verifier or model_energy(diffusion)
    problems, others = x.shape[1], max(ns) - 1
    answers = [run_sampler(diffusion, x, diffusion._packed(noises[0].to(x)), inner_steps, step_scale, given,
                           generator, sampler).answer]
    if others:  # rows candidate-major: candidate k's problem b is row (k - 1) * B + b
        repeat = lambda v: torch.cat([v] * others, dim=-2)  # noqa: E731  [..., B, D] -> [..., others * B, D]
        rest = run_sampler(diffusion, repeat(x), diffusion._packed(noises[1:others + 1].flatten(0, 1).to(x)),
                           inner_steps, step_scale, None if given is None else tuple(map(repeat, given)),
                           generator, sampler).answer
        answers += rest.unflatten(1, (others, problems)).unbind(1)
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


# -- scoring a packed model ----------------------------------------------------------------------------------
def precision(config: RunConfig) -> tuple[torch.dtype, bool]:
    """(the dtype of weights and data, whether to autocast to bfloat16) that model.dtype asks for."""
    return TORCH_DTYPES[config.model["dtype"]], config.model["dtype"] == "bfloat16"


class Evaluator:
    """Held-out scores of a packed model's EMA and raw weights, per run, as the config's eval.* says.

    `ema` and `raw` are the models it scores (the trainer's, as they train; or a checkpoint's). Scores are
    each metric's mean over a held-out set's problems: '<metric>_<set>' (EMA) and '<metric>_<set>_raw'.
    """

    def __init__(self, task: Task, config: RunConfig, accelerator: Accelerator, ema: GaussianDiffusion1D,
                 raw: GaussianDiffusion1D):
        self.task, self.eval, self.accelerator = task, config.eval, accelerator
        self.models = {"": ema, "_raw": raw}
        self.dtype, self.autocast = precision(config)
        # held-out errors are summed in double, where the device has it (MPS does not)
        self._sum_dtype = torch.float32 if accelerator.device.type == "mps" else torch.float64
        self._setup = repr((config.task, config.model, dataclasses.asdict(config.diffusion)))  # SAMPLING_FLOPS' key
        # each process scores its own slice of every held-out set; the sums are reduced across processes
        self.held_out = task.held_out(config.eval.num_samples)
        self.local_held_out = self._local(self.held_out)
        # the energy landscape (ranking, best-of-N) is measured on the first eval.landscape_samples problems
        self.landscape_sets = {name: data.select(slice(0, config.eval.landscape_samples or None))
                               for name, data in self.held_out.items()}
        self.local_landscape = self._local(self.landscape_sets)
        self.bar: Any = None  # the final scoring's progress bar, while it runs

    def metric_keys(self) -> list[str]:
        """'<metric>_<set>' for every metric of the task and held-out set, in the task's order."""
        return [f"{metric.name}_{name}" for name in self.held_out for metric in self.task.metrics]

    def declaration(self) -> dict[str, Any]:
        """What the scores mean (final.json's): metric -> "higher" or "lower" (better), metric -> label, the sets."""
        metrics = self.task.metrics
        return {"metrics": {m.name: "higher" if m.higher_is_better else "lower" for m in metrics},
                "metric_labels": {m.name: m.label for m in metrics}, "sets": list(self.held_out)}

    def yardsticks(self) -> dict[str, dict[str, dict[str, float]]]:
        """Per held-out set, the task's simple predictors' scores (zeros, linear, ...) to read the model's against."""
        return {name: self.task.yardsticks(data) for name, data in self.held_out.items()}

    @torch.no_grad()
    def evaluate(self, diffusion: GaussianDiffusion1D | None = None, inner_steps: int | None = None,
                 sampler: Mapping[str, Any] | None = None) -> list[dict[str, float]]:
        """Per run, '<metric>_<set>' of `diffusion` (default: the EMA model) sampling with `sampler` (default:
        its own): each metric's mean over the problems of each held-out set."""
        diffusion = diffusion or self.models[""]
        means = self._set_means(lambda name, data: self._score_sums(diffusion, name, data, inner_steps, sampler))
        return [{f"{metric}_{name}": value for name, values in run.items() for metric, value in values.items()}
                for run in means]

    @torch.no_grad()
    def scores(self, sampler: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """Per run, the EMA's and the raw model's scores (a validation line's), sampling with `sampler`."""
        ema, raw = (self.evaluate(diffusion, sampler=sampler) for diffusion in self.models.values())
        return [{**e, **{f"{k}_raw": v for k, v in r.items()}} for e, r in zip(ema, raw)]

    @torch.no_grad()
    def final_scores(self, progress: str | None = None) -> list[dict[str, Any]]:
        """Per run: `scores` and, per sampler (the configured one at the top level, eval.samplers under
        "samplers"), the inference inner-step sweep and best-of-N, with FLOPs per answer; and the ranking of
        true answers (eval.ranking_scales). `progress`: a progress bar's label (none without it)."""
        if progress is not None:
            self.bar = tqdm(total=self._passes(), desc=progress, leave=False,
                            disable=not self.accelerator.is_main_process, **bar_rate())
        try:
            scores = self._sampler_scores(None)
            if self.eval.ranking_scales:
                for score, ranking in zip(scores, self._rankings()):
                    score.update(ranking)
            for config in self.eval.samplers:
                for score, other in zip(scores, self._sampler_scores(config)):
                    score.setdefault("samplers", {})[sampler_label(config)] = other
            return scores
        finally:
            if self.bar is not None:
                self.bar.close()
            self.bar = None

    def _passes(self) -> int:
        """Held-out set passes of the final scoring (for its progress bar)."""
        ev = self.eval
        per_sampler = 2 + len(ev.inference_steps_sweep) + (2 if ev.best_of else 0)
        return len(self.held_out) * (per_sampler * (1 + len(ev.samplers)) + (2 if ev.ranking_scales else 0))

    def _local(self, sets: dict[str, HeldOutSet]) -> dict[str, HeldOutSet]:
        """This process's slice of each set, on its device."""
        acc = self.accelerator
        return {name: data.shard(acc.process_index, acc.num_processes).to(acc.device) for name, data in sets.items()}

    def _set_means(self, sums_of: Callable[[str, HeldOutSet], dict[str, Tensor]],
                   landscape: bool = False) -> list[dict[str, dict[str, Any]]]:
        """Per run and held-out set name, key -> the mean over the set's problems (`landscape`: the landscape's
        problems of it) of what `sums_of(name, slice)` sums over this process's slice (key -> [P, ...]); the
        sums are reduced across processes."""
        full, local = (self.landscape_sets, self.local_landscape) if landscape else (self.held_out, self.local_held_out)
        results: list[dict[str, dict[str, Any]]] = [{} for _ in range(self.models[""].runs)]
        for name, data in local.items():
            count = full[name].y.shape[0]
            for key, total in sums_of(name, data).items():
                reduced = (self.accelerator.reduce(total, reduction="sum") / count).tolist()
                for result, value in zip(results, reduced):
                    result.setdefault(name, {})[key] = value
            if self.bar is not None:
                self.bar.update(1)
        return results

    def _chunks(self, data: HeldOutSet) -> Iterator[tuple[int, HeldOutSet]]:
        chunk = self.eval.batch_size
        for start in range(0, data.x.shape[0], chunk):
            yield start, data.select(slice(start, start + chunk))

    def _given(self, part: HeldOutSet) -> Any:
        return None if part.mask is None else (part.mask, part.y.to(self.dtype))

    def _generator(self, name: str, start: int) -> torch.Generator:
        """A noisy sampler's numbers for the chunk of held-out set `name` at `start`: fixed by the set, the
        process and the chunk, so scoring is reproducible and every strategy and seed draws the same."""
        seed = mix_seed(zlib.crc32(name.encode()), self.accelerator.process_index, start)
        return torch.Generator(device=self.accelerator.device).manual_seed(seed)

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    def _sample(self, diffusion: GaussianDiffusion1D, name: str, start: int, part: HeldOutSet,
                inner_steps: int | None = None, sampler: Mapping[str, Any] | None = None) -> Tensor:
        with self._autocast():
            return diffusion.sample_with_stats(part.x.to(self.dtype), noise=part.noise, inner_steps=inner_steps,
                                               generator=self._generator(name, start), given=self._given(part),
                                               sampler=sampler).answer

    def _score_sums(self, diffusion: GaussianDiffusion1D, name: str, data: HeldOutSet, inner_steps: int | None,
                    sampler: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
        """Per metric, each run's sum [P] over this process's problems of the task's per-problem score."""
        sums: dict[str, Tensor] = {}
        for start, part in self._chunks(data):
            answer = self._sample(diffusion, name, start, part, inner_steps, sampler)
            for metric, values in self.task.score(answer, part).items():
                total = values.to(self._sum_dtype).sum(dim=-1)
                sums[metric] = sums[metric] + total if metric in sums else total
        return sums

    def _sampler_scores(self, sampler: Mapping[str, Any] | None) -> list[dict[str, Any]]:
        """What scoring with `sampler` (None: the configured one) gives, per run: see final_scores."""
        scores = self.scores(sampler)
        steps = self.eval.inference_steps_sweep
        for score in scores:
            score["inference_steps_sweep"] = {}
        for n in steps:
            for score, result in zip(scores, self.evaluate(inner_steps=n, sampler=sampler)):
                score["inference_steps_sweep"][str(n)] = result
        raw = self.models["_raw"]
        flops = self._sampling_flops(sampler, [raw.inference_steps, *steps])
        for score in scores:
            score.update(sampler=sampler or raw.sampler_config, sampler_flops_per_answer=flops[0],
                         inference_steps_sweep_flops=dict(zip(map(str, steps), flops[1:])))
        if self.eval.best_of:
            for suffix, diffusion in self.models.items():
                for score, best in zip(scores, self._best_of(diffusion, sampler, flops[0])):
                    score.update({f"best_of_{name}{suffix}": table for name, table in best.items()})
        return scores

    # -- the energy landscape, final scoring only ------------------------------------------------------------
    def _sampling_flops(self, sampler: Mapping[str, Any] | None, inner_steps: Sequence[int]) -> list[float]:
        """Matmul FLOPs per answer of one sampling pass with each inner-step count, counted on (at most)
        FLOP_PROBLEMS problems of the first held-out set (the count grows with the problems, plus a per-batch
        term for the time embedding that this many problems make small)."""
        diffusion = self.models[""]
        name, data = next(iter(self.local_held_out.items()))
        part = data.select(slice(0, FLOP_PROBLEMS))
        x, noise = diffusion._packed(part.x.to(self.dtype)), diffusion._packed(part.noise)
        flops = []
        for n in inner_steps:
            key = (self._setup, repr(sampler), tuple(x.shape), n)
            if key not in SAMPLING_FLOPS:
                SAMPLING_FLOPS[key] = sampling_flops(diffusion, x, noise, n, diffusion.inference_step_scale,
                                                     self._given(part), self._generator(name, 0), sampler)
            flops.append(SAMPLING_FLOPS[key])
        return flops

    def _extra_noise(self, name: str, count: int, salt: int) -> Tensor:
        """[count, this process's landscape problems, D] standard normals fixed by the held-out set (every
        strategy, seed, process count and landscape subset sees the same per problem)."""
        full = self.held_out[name].y
        noise = fixed_noise(count, full.shape[0], full.shape[1], mix_seed(zlib.crc32(name.encode()), salt))
        noise = noise[:, :self.landscape_sets[name].y.shape[0]]
        acc = self.accelerator
        return torch.tensor_split(noise, acc.num_processes, dim=1)[acc.process_index].to(acc.device)

    def _rankings(self) -> list[dict[str, Any]]:
        """Per run, "ranking_<set>" (EMA) and "ranking_<set>_raw": {distance: {level: fraction ranked right}}."""
        scales, levels = self.eval.ranking_scales, self.eval.ranking_levels
        levels = levels or list(range(self.models[""].num_timesteps))
        distances = [f"sigma_{sigma:g}" for sigma in scales] + ["samples"]
        results: list[dict[str, Any]] = [{} for _ in range(self.models[""].runs)]
        for suffix, diffusion in self.models.items():
            means = self._set_means(lambda name, data: self._ranking_sums(diffusion, name, data, levels), landscape=True)
            for result, run in zip(results, means):
                for name, values in run.items():
                    result[f"ranking_{name}{suffix}"] = {
                        d: {str(t): v for t, v in zip(levels, row)} for d, row in zip(distances, values["correct"])
                    }
        return results

    def _ranking_sums(self, diffusion: GaussianDiffusion1D, name: str, data: HeldOutSet, levels: list[int]) -> dict[str, Tensor]:
        """{"correct": [P, distances, levels]}: pairs ranked right, summed over this process's problems; the
        candidates are the true answer plus sigma * noise per scale, and the model's own samples."""
        scales = self.eval.ranking_scales
        directions = self._extra_noise(name, len(scales), salt=1)
        # a 'scaled' answer is sqrt(abar_0) x0: rank the x0 it stands for
        unscale = diffusion.sqrt_alphas_cumprod[0] if diffusion.answer == "scaled" else 1.0
        total = None
        for start, part in self._chunks(data):
            samples = self._sample(diffusion, name, start, part) / unscale
            with self._autocast():
                ranking = rank_true_answers(diffusion, part.x.to(self.dtype), part.y.to(self.dtype), scales,
                                            directions[:, start:start + part.x.shape[0]], candidates={"samples": samples},
                                            levels=levels, given=self._given(part))
            sums = ranking.correct.to(self._sum_dtype).sum(dim=-1)
            total = sums if total is None else total + sums
        return {"correct": total}

    def _best_of(self, diffusion: GaussianDiffusion1D, sampler: Mapping[str, Any] | None,
                 sample_flops: float) -> list[dict[str, Any]]:
        """Per run and held-out set: {"<n>": {"<metric>": {"energy", "random", "oracle"}, "flops_per_answer"}}."""
        ns = sorted(set(self.eval.best_of))
        means = self._set_means(lambda name, data: self._best_of_sums(diffusion, name, data, ns, sampler), landscape=True)
        name, data = next(iter(self.local_held_out.items()))
        x = diffusion._packed(data.x[:FLOP_PROBLEMS].to(self.dtype))
        flops = {n: best_of_flops(n, sample_flops, verifier_flops(diffusion, x, n)) for n in ns}
        results = []
        for run in means:
            tables = {}
            for set_name, values in run.items():
                table: dict[str, Any] = {str(n): {"flops_per_answer": flops[n]} for n in ns}
                for key, value in values.items():
                    n, metric, pick = key.split("/")
                    table[n].setdefault(metric, {})[pick] = value
                tables[set_name] = table
            results.append(tables)
        return results

    def _best_of_sums(self, diffusion: GaussianDiffusion1D, name: str, data: HeldOutSet, ns: list[int],
                      sampler: Mapping[str, Any] | None) -> dict[str, Tensor]:
        """'<n>/<metric>/<pick>' -> [P] sums over this process's problems; candidate 0 is the set's own start
        noise and generator, so n = 1 is plain scoring."""
        extra = self._extra_noise(name, max(ns) - 1, salt=2)
        directions = {m.name: m.higher_is_better for m in self.task.metrics}
        sums: dict[str, Tensor] = {}
        for start, part in self._chunks(data):
            noises = torch.cat([part.noise[None], extra[:, start:start + part.x.shape[0]]])
            with self._autocast():
                results = best_of_n(diffusion, part.x.to(self.dtype), noises, lambda a: self.task.score(a, part),
                                    directions, ns, given=self._given(part), generator=self._generator(name, start),
                                    sampler=sampler)
            for result in results:
                for pick, values in (("energy", result.energy_pick), ("random", result.random_pick), ("oracle", result.oracle)):
                    for metric, v in values.items():
                        key, total = f"{result.n}/{metric}/{pick}", v.to(self._sum_dtype).sum(dim=-1)
                        sums[key] = sums[key] + total if key in sums else total
        return sums


def evaluate_saved(config: RunConfig, diffusion: GaussianDiffusion1D, task: Task,
                   accelerator: Accelerator) -> dict[str, Any]:
    """`train.py --evaluate`: the final scores of the newest checkpoint in config.results_dir, its EMA and raw
    weights loaded into `diffusion` and a copy of it, with `config`'s sampling settings; reads the run
    folder only (sampling keys may differ from the run's, see run_dir.EVALUATION_CHANGES)."""
    run_dir = RunDir(config.results_dir)
    lock = run_dir.lock(optional=True) if accelerator.is_main_process else None  # no trainer may write meanwhile
    try:
        run_dir.check(config, resume=True, overwrite=False, may_change=EVALUATION_CHANGES)
        code = code_version() if accelerator.is_main_process else {}
        torch.set_float32_matmul_precision(config.train.matmul_precision)
        state = load_latest_checkpoint(run_dir.checkpoints, required=("model", "ema"))
        if state is None:
            raise ConfigError(f"--evaluate: no readable checkpoint in '{run_dir.checkpoints}'")
        raw = diffusion.to(device=accelerator.device, dtype=precision(config)[0])
        ema = copy.deepcopy(raw).requires_grad_(False)  # as ema-pytorch makes its averaged copy
        for model, key in ((raw, "model"), (ema, "ema")):
            load_run_state_dict(model, state[key], 0)
        scores = Evaluator(task, config, accelerator, ema, raw).final_scores()
        return {"step": state["step"], **scores[0], **code}
    finally:
        if lock is not None:
            lock.release()
