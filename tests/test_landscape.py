"""Samplers and the energy landscape: today's sampler unchanged, the noisy samplers' rules, FLOPs against a
count from the shapes, the ranking measure and best-of-N on hand-made energies with known answers."""
import copy
import json
import math
import zlib

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import train
from diffusion_lib import EBM, EnergyDenoiser, GaussianDiffusion1D, resolve_mining_config
from diffusion_lib.harness import evaluate
from diffusion_lib.harness.build import create_dataset, create_diffusion_model
from diffusion_lib.harness.config import ConfigError, build_config
from diffusion_lib.harness.evaluate import (
    Evaluator, best_of_flops, best_of_n, energy_at, fixed_noise, rank_true_answers, verifier_flops,
)
from diffusion_lib.harness.trainer import make_accelerator
from diffusion_lib.samplers import SAMPLERS, _mala_log_ratio, resolve_sampler_config, sampler_label, sampling_flops
from diffusion_lib.schedule import schedule_constants
from diffusion_lib.tasks.base import make_task, mix_seed

RANK, HIDDEN, BATCH, T, TIME = 3, 16, 12, 10, 128
D = RANK * RANK


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_diffusion(runs: int = 1, sampler=None, **kwargs) -> GaussianDiffusion1D:
    ebm = EBM(SimpleNamespace(inp_dim=D, out_dim=D), hidden_dim=HIDDEN, runs=runs)
    for run in range(runs):
        ebm.init_run(run, 10 + run)
    return GaussianDiffusion1D(EnergyDenoiser(ebm), mining_config=resolve_mining_config({"strategy": "none"}),
                               sampler=resolve_sampler_config(sampler), **kwargs)


def problems(batch: int = BATCH, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return make_task({"dataset": "inverse", "rank": RANK}).sample(batch, torch.Generator().manual_seed(seed))[:2]


def start_noise(batch: int = BATCH, seed: int = 6) -> torch.Tensor:
    return torch.randn(batch, D, generator=torch.Generator().manual_seed(seed))


# -- the ired sampler is today's sampler ---------------------------------------------------------------------
def todays_sample(diffusion, x, noise, inner_steps):
    """GaussianDiffusion1D.sample as it was before the registry (commit 76ca820), line for line."""
    x = diffusion._packed(x)
    runs, batch = x.shape[:2]
    y = diffusion._packed(noise).to(x.dtype)
    t = torch.empty(runs, batch, dtype=torch.long)
    for step in reversed(range(diffusion.num_timesteps)):
        t.fill_(step)
        cond = diffusion.condition(x, t)
        _, eps_hat = diffusion.model.energy_and_grad(cond, y)
        x0 = diffusion.x0_from_noise(y, t, eps_hat).clamp(-diffusion.data_bound, diffusion.data_bound)
        scale_t = diffusion.sqrt_alphas_cumprod[step]
        y = scale_t * x0
        if inner_steps > 0:
            y = diffusion.opt_step(cond, y, t, inner_steps, diffusion.inference_step_scale,
                                   diffusion.inference_step_schedule).y
        y = y.clamp(-diffusion.data_bound * scale_t, diffusion.data_bound * scale_t)
        x0 = y / scale_t
        if step > 0:
            y = diffusion.sqrt_alphas_cumprod[step - 1] * x0
    return x0 * diffusion.sqrt_alphas_cumprod[0] if diffusion.answer == "scaled" else x0


@pytest.mark.parametrize("inner_steps, settings", [
    (0, {}), (5, {}), (3, {"inference_step_schedule": "reference", "answer": "scaled", "inference_step_scale": 2.0}),
])
def test_ired_sampler_gives_todays_numbers_bit_for_bit(inner_steps, settings):
    diffusion = make_diffusion(runs=2, **settings)
    assert diffusion.sampler_config == {"name": "ired"}
    x, _ = problems()
    with torch.no_grad():
        expected = todays_sample(diffusion, x, start_noise(), inner_steps)
    assert torch.equal(diffusion.sample(x, noise=start_noise(), inner_steps=inner_steps), expected)
    assert not torch.equal(expected[0], expected[1])  # two runs of a pack, two different models


# -- Langevin and MALA ---------------------------------------------------------------------------------------
def descent_sample(diffusion, x, noise, inner_steps, scale):
    """The spec's sampler with plain gradient descent (no rejection) as the inner steps, run by hand."""
    ebm, y = diffusion.model.ebm, noise
    for step in reversed(range(T)):
        t = torch.full((1, x.shape[0]), step)
        cond = ebm.condition(x[None], t, T)
        _, eps_hat = ebm.energy_and_grad(cond, y[None])
        a, a_prev = diffusion.sqrt_alphas_cumprod[step], diffusion.sqrt_alphas_cumprod[max(step - 1, 0)]
        x0 = ((y - math.sqrt(1 - a**2) * eps_hat[0]) / a).clamp(-2, 2)
        y = a * x0
        eta = diffusion.betas[step] / math.sqrt(1 - a**2)
        for _ in range(inner_steps):
            y = (y - eta * scale * ebm.energy_and_grad(cond, y[None])[1][0]).clamp(-2 * a, 2 * a)
        x0 = y / a
        y = a_prev * x0
    return x0


def test_langevin_at_zero_temperature_is_plain_descent():
    diffusion = make_diffusion(sampler={"name": "langevin", "temperature": 0.0})
    x, _ = problems()
    answer = diffusion.sample(x, noise=start_noise(), inner_steps=4, step_scale=3.0)
    torch.testing.assert_close(answer[0], descent_sample(diffusion, x, start_noise(), 4, 3.0), rtol=1e-5, atol=1e-6)
    # and it is not ired's descent: without rejection some steps raise the energy and are kept
    assert not torch.allclose(answer, make_diffusion().sample(x, noise=start_noise(), inner_steps=4, step_scale=3.0))


def test_langevin_noise_comes_from_the_generator_and_follows_its_schedule():
    x, _ = problems()
    answers = {}
    for schedule in ("constant", "linear"):
        diffusion = make_diffusion(sampler={"name": "langevin", "temperature": 0.5, "temperature_schedule": schedule})
        runs = [diffusion.sample(x, noise=start_noise(), inner_steps=3, generator=torch.Generator().manual_seed(s))
                for s in (0, 0, 1)]
        assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
        answers[schedule] = runs[0]
    cold = make_diffusion(sampler={"name": "langevin", "temperature": 0.0}).sample(x, noise=start_noise(), inner_steps=3)
    # annealing the temperature over each level's inner steps: the answers move less far from the noise-free ones
    assert (answers["linear"] - cold).norm() < (answers["constant"] - cold).norm()


def test_mala_log_ratio_is_metropolis_hastings_for_exp_minus_energy_over_tau():
    g = torch.Generator().manual_seed(3)
    y, proposal, grad, new_grad = (torch.randn(2, 5, D, generator=g, dtype=torch.float64) for _ in range(4))
    energy, new_energy = (torch.rand(2, 5, 1, generator=g, dtype=torch.float64) for _ in range(2))
    h, tau = torch.rand(2, 5, 1, generator=g, dtype=torch.float64) * 0.1 + 0.01, 0.7
    normal = torch.distributions.Normal
    scale = (2 * h * tau).sqrt()
    log_q_forward = normal(y - h * grad, scale).log_prob(proposal).sum(-1, keepdim=True)
    log_q_backward = normal(proposal - h * new_grad, scale).log_prob(y).sum(-1, keepdim=True)
    expected = (-new_energy / tau + log_q_backward) - (-energy / tau + log_q_forward)
    torch.testing.assert_close(_mala_log_ratio(y, proposal, grad, new_grad, energy, new_energy, h, tau, None), expected)
    # with given entries, only the free ones enter the proposal density
    free = torch.rand(2, 5, D, generator=g) < 0.5
    log_q_ratio = normal(proposal - h * new_grad, scale).log_prob(y) - normal(y - h * grad, scale).log_prob(proposal)
    expected_free = (energy - new_energy) / tau + (log_q_ratio * free).sum(-1, keepdim=True)
    torch.testing.assert_close(_mala_log_ratio(y, proposal, grad, new_grad, energy, new_energy, h, tau, free), expected_free)


def test_mala_accept_rate_is_a_rate_and_falls_with_the_step():
    x, _ = problems()
    diffusion = make_diffusion(sampler={"name": "mala", "temperature": 0.1})
    rates = []
    for scale in (0.1, 30.0):
        sampled = diffusion.sample_with_stats(x, noise=start_noise(), inner_steps=3, step_scale=scale,
                                              generator=torch.Generator().manual_seed(0))
        rate = sampled.stats["accept_rate"]
        assert rate.shape == (1,) and sampled.stats["accept_rate_steps"].shape == (1, 3 * T)
        assert 0.0 <= float(rate) <= 1.0
        rates.append(float(rate))
    assert rates[0] > rates[1]


# -- FLOPs per answer ----------------------------------------------------------------------------------------
def energy_flops(batch: int) -> int:
    return 2 * batch * (D * HIDDEN + 2 * HIDDEN * HIDDEN + HIDDEN * D)  # fc1 on y, fc2, fc3, fc4


def condition_flops(batch: int) -> int:
    """The time path on all T timesteps (two 128 x 128 layers, two 128 -> 2H FiLM maps) and fc1 on x."""
    return 2 * T * TIME * TIME * 2 + 2 * T * TIME * 2 * HIDDEN * 2 + 2 * batch * D * HIDDEN


def expected_sampler_flops(name: str, inner_steps: int, batch: int = BATCH) -> float:
    """Per level: the condition, E and grad for the denoiser (2 E), then the inner steps: ired evaluates E
    and grad at the start and at every proposal but the last (E only there); Langevin E and grad per step;
    MALA E and grad at the start and at every proposal."""
    e = energy_flops(batch)
    inner = {
        "ired": 2 * e * inner_steps + e if inner_steps else 0,
        "langevin": 2 * e * inner_steps,
        "mala": 2 * e * (inner_steps + 1) if inner_steps else 0,
    }[name]
    return T * (condition_flops(batch) + 2 * e + inner) / batch


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("inner_steps", [0, 3])
def test_every_samplers_flops_match_a_count_from_the_shapes(name, inner_steps):
    diffusion = make_diffusion(sampler=name)
    x, _ = problems()
    flops = sampling_flops(diffusion, x[None], start_noise()[None], inner_steps, 1.0,
                           generator=torch.Generator().manual_seed(0))
    assert flops == expected_sampler_flops(name, inner_steps)


# -- the sampler's configuration -----------------------------------------------------------------------------
def test_sampler_config_is_validated_in_one_line():
    assert resolve_sampler_config("langevin") == {"name": "langevin", "temperature": 1.0, "temperature_schedule": "constant"}
    with pytest.raises(ValueError, match=r"'malla' is unknown \(did you mean 'mala'\?\); allowed: ired, langevin, mala"):
        resolve_sampler_config("malla")
    with pytest.raises(ValueError, match=r"sampler\['temperature'\] = 0.0 is invalid: must be a float > 0"):
        resolve_sampler_config({"name": "mala", "temperature": 0})
    with pytest.raises(ValueError, match=r"unknown key 'temprature' for sampler 'langevin' \(did you mean 'temperature'\?\)"):
        resolve_sampler_config({"name": "langevin", "temprature": 1.0})
    config = train.build_config({"diffusion.sampler": "mala", "task.rank": RANK, "model.hidden_dim": HIDDEN})
    assert train.create_diffusion_model(config, make_task({"dataset": "inverse", "rank": RANK})).sampler_config["name"] == "mala"
    with pytest.raises(ConfigError, match="'diffusion.sampler' = 'mcmc' is invalid: sampler 'mcmc' is unknown; allowed: ired, langevin, mala"):
        train.build_config({"diffusion.sampler": "mcmc"})
    config = train.build_config({"diffusion.sampler": {"name": "langevin", "temperature": 0.5}, "eval.samplers": ["mala"]})
    assert config.diffusion.sampler == {"name": "langevin", "temperature": 0.5, "temperature_schedule": "constant"}
    assert config.eval.samplers == [{"name": "mala", "temperature": 1.0}]
    assert sampler_label(config.diffusion.sampler) == "langevin(temperature=0.5)" and sampler_label(config.eval.samplers[0]) == "mala"


# -- energy as a verifier on hand-made energies ----------------------------------------------------------------
class QuadraticEnergy(nn.Module):
    """E(x, y, t) = sign * |y - sqrt(abar_t) x|^2 (x is the true answer): its minimum is the true answer as the
    sampler sees it at level t; sign -1 reverses it, 0 makes it constant."""

    def __init__(self, sign: float, runs: int = 1):
        super().__init__()
        self.sign, self.runs, self.out_dim = sign, runs, D
        self.register_buffer("scale", schedule_constants(T)["sqrt_alphas_cumprod"])

    def condition(self, x, t, num_timesteps):
        return x, self.scale[t].unsqueeze(-1)

    def energy_and_grad(self, cond, y, need_grad=True):
        x, scale = cond
        if y.dim() == 4:
            x, scale = x.unsqueeze(1), scale.unsqueeze(1)
        diff = y - scale * x
        energy = self.sign * diff.pow(2).sum(dim=-1, keepdim=True)
        return energy, 2 * self.sign * diff if need_grad else None


def quadratic(sign: float, runs: int = 1) -> GaussianDiffusion1D:
    return GaussianDiffusion1D(QuadraticEnergy(sign, runs), mining_config=resolve_mining_config({"strategy": "none"}))


SCALES = [0.01, 0.1, 1.0]


@pytest.mark.parametrize("sign, expected", [(1.0, 1.0), (-1.0, 0.0), (0.0, 0.5)])
def test_ranking_on_a_quadratic_energy_centred_on_the_true_answer(sign, expected):
    _, y = problems()
    samples = y + 0.05 * start_noise()
    ranking = rank_true_answers(quadratic(sign, runs=2), y, y, SCALES, fixed_noise(len(SCALES), BATCH, D, seed=0),
                                candidates={"samples": samples[None].expand(2, -1, -1)})
    assert ranking.distances == ["sigma_0.01", "sigma_0.1", "sigma_1", "samples"] and ranking.levels == list(range(T))
    assert ranking.correct.shape == (2, 4, T, BATCH)
    assert torch.equal(ranking.fraction(), torch.full((2, 4, T), expected))
    assert ranking.table(1)["samples"]["0"] == expected


def test_ranking_in_the_training_view_noises_both_answers_with_the_shared_eps():
    _, y = problems()
    directions, eps = fixed_noise(len(SCALES), BATCH, D, seed=0), start_noise(seed=9)
    ranking = rank_true_answers(quadratic(1.0), y, y, SCALES, directions, levels=[0, 5, 9], view="training", renoise=eps)
    scale = schedule_constants(T)["sqrt_alphas_cumprod"]
    for j, level in enumerate([0, 5, 9]):
        a = scale[level]
        noised = a * y + (1 - a**2).sqrt() * eps  # E is |y_t - a y|^2 by hand
        e_true = (noised - a * y).pow(2).sum(-1)
        for i, sigma in enumerate(SCALES):
            e_other = (a * (y + sigma * directions[i]) + (1 - a**2).sqrt() * eps - a * y).pow(2).sum(-1)
            torch.testing.assert_close(ranking.correct[0, i, j], (e_true < e_other).float())
    # large perturbations are told apart, small ones against the noise much less often
    assert ranking.fraction()[0, 2, 0] > 0.95 > 0.8 > ranking.fraction()[0, 0, 0]  # at level 0


def test_energy_at_matches_the_model_at_each_level():
    diffusion = make_diffusion()
    x, y = problems()
    answers = torch.stack([y, start_noise()])[None]  # [P, k, B, D]
    for level in (0, 7):
        t = torch.full((BATCH,), level)
        scaled = diffusion.sqrt_alphas_cumprod[level] * answers[0]
        expected = torch.stack([diffusion.model.energy(x[None], a[None], t[None], T)[0, :, 0] for a in scaled])
        torch.testing.assert_close(energy_at(diffusion, x, answers, level)[0], expected)


# -- best-of-N -----------------------------------------------------------------------------------------------
def mse_to(y):
    return lambda answers: {"mse": (answers - y).pow(2).mean(dim=-1)}


LOWER = {"mse": False}


def test_best_of_one_is_plain_sampling():
    diffusion = make_diffusion(runs=2)
    x, y = problems()
    noises = torch.cat([start_noise()[None], fixed_noise(3, BATCH, D, seed=4)])
    [one, four] = best_of_n(diffusion, x, noises, mse_to(y), LOWER, ns=[1, 4], inner_steps=2)
    plain = mse_to(y)(diffusion.sample(x, noise=start_noise(), inner_steps=2))["mse"]
    for picked in (one.energy_pick, one.random_pick, one.oracle):
        assert torch.equal(picked["mse"], plain)
    assert one.energy_pick["mse"].shape == (2, BATCH)
    assert (four.oracle["mse"] <= four.energy_pick["mse"]).all() and (four.oracle["mse"] <= four.random_pick["mse"]).all()
    assert (four.oracle["mse"] < plain).any()  # the other noises give other answers


@pytest.mark.parametrize("name", ["langevin", "mala"])
def test_best_of_one_is_plain_sampling_with_a_noisy_sampler_from_the_same_generator(name):
    diffusion = make_diffusion(sampler=name)
    x, y = problems()
    noises = torch.cat([start_noise()[None], fixed_noise(3, BATCH, D, seed=4)])
    [one] = best_of_n(diffusion, x, noises, mse_to(y), LOWER, ns=[1], inner_steps=2, generator=torch.Generator().manual_seed(5))
    plain = diffusion.sample(x, noise=start_noise(), inner_steps=2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(one.energy_pick["mse"], mse_to(y)(plain)["mse"])


def test_with_the_true_energy_as_verifier_the_pick_is_the_oracle():
    diffusion = make_diffusion()
    x, y = problems()
    noises = fixed_noise(8, BATCH, D, seed=4)
    true_error = lambda x_, answers: (answers - y).pow(2).mean(dim=-1)  # noqa: E731
    both = lambda a: {"mse": mse_to(y)(a)["mse"], "neg_mse": -mse_to(y)(a)["mse"]}  # noqa: E731
    for result in best_of_n(diffusion, x, noises, both, {"mse": False, "neg_mse": True}, ns=[1, 2, 8],
                            verifier=true_error, inner_steps=1):
        for metric in ("mse", "neg_mse"):
            assert torch.equal(result.energy_pick[metric], result.oracle[metric])
        assert (result.oracle["mse"] <= result.random_pick["mse"]).all()
        assert (result.oracle["neg_mse"] >= result.random_pick["neg_mse"]).all()


def test_best_of_n_is_nested_and_picks_the_lowest_final_energy():
    diffusion = make_diffusion()
    x, y = problems()
    noises = fixed_noise(4, BATCH, D, seed=4)
    results = best_of_n(diffusion, x, noises, mse_to(y), LOWER, ns=[1, 2, 4], inner_steps=2)
    [again] = best_of_n(diffusion, x, noises[:2], mse_to(y), LOWER, ns=[2], inner_steps=2)
    assert torch.equal(results[1].energy_pick["mse"], again.energy_pick["mse"])
    assert torch.equal(results[1].oracle["mse"], again.oracle["mse"])
    answers = torch.stack([diffusion.sample(x, noise=n, inner_steps=2) for n in noises], dim=1)
    pick = energy_at(diffusion, x, answers, 0).argmin(dim=1)
    errors = torch.stack([mse_to(y)(a)["mse"] for a in answers.unbind(1)], dim=1)
    assert torch.equal(results[2].energy_pick["mse"], errors.gather(1, pick[:, None]).squeeze(1))


def test_best_of_n_costs_n_samples_plus_n_energies():
    diffusion = make_diffusion()
    x, _ = problems()
    sample = sampling_flops(diffusion, x[None], start_noise()[None], 2, 1.0)
    assert sample == expected_sampler_flops("ired", 2)
    # scoring: the condition at level 0 once for the N = 4 candidates, E on each
    verify = verifier_flops(diffusion, x, 4)
    assert verify == pytest.approx((condition_flops(BATCH) + energy_flops(4 * BATCH)) / (4 * BATCH), rel=1e-12)
    assert [best_of_flops(n, sample, verify) for n in (1, 2, 4)] == [sample, 2 * (sample + verify), 4 * (sample + verify)]


@pytest.mark.parametrize("with_given", [False, True])
def test_best_of_n_sampled_as_one_batch_equals_a_loop_of_plain_samples(with_given):
    """The N - 1 candidates after the first are sampled as one batch: each must be the answer plain sampling
    gives from its own noise, for every run of a pack and with given entries held."""
    diffusion = make_diffusion(runs=2)
    x, y = problems()
    noises = fixed_noise(5, BATCH, D, seed=4)
    mask = torch.rand(BATCH, D, generator=torch.Generator().manual_seed(2)) < 0.3
    given = (mask, y) if with_given else None
    results = best_of_n(diffusion, x, noises, mse_to(y), LOWER, ns=[1, 3, 5], inner_steps=2, given=given)
    answers = torch.stack([diffusion.sample(x, noise=n, inner_steps=2, given=given) for n in noises], dim=1)
    errors = torch.stack([mse_to(y)(a)["mse"] for a in answers.unbind(1)], dim=1)  # [P, N, B]
    energies = energy_at(diffusion, x, answers, 0)
    for result in results:
        n = result.n
        pick = energies[:, :n].argmin(dim=1, keepdim=True)
        torch.testing.assert_close(result.energy_pick["mse"], errors[:, :n].gather(1, pick).squeeze(1), rtol=1e-6, atol=0)
        torch.testing.assert_close(result.random_pick["mse"], errors[:, :n].mean(dim=1), rtol=1e-6, atol=0)
        torch.testing.assert_close(result.oracle["mse"], errors[:, :n].amin(dim=1), rtol=1e-6, atol=0)


def test_evaluate_may_change_the_sampler(tmp_path, tiny_args):
    assert train.main(tiny_args("--train-steps", "10")) == 0
    assert train.main(tiny_args("--train-steps", "10", "--evaluate", "diffusion.sampler=langevin")) == 0
    evaluations = tmp_path / "run" / "evaluations"
    [path] = list(evaluations.iterdir())
    assert path.name == "step-10__sampler=langevin.json"  # the sampler named by its label
    result = json.loads(path.read_text())
    assert result["settings"]["diffusion.sampler"] == {"name": "langevin", "temperature": 1.0, "temperature_schedule": "constant"}
    assert result["mse_id"] != json.loads((tmp_path / "run" / "final.json").read_text())["mse_id"]


@pytest.mark.parametrize("name", ["ired", "langevin", "mala"])
def test_every_sampler_keeps_given_entries(name):
    """With given entries (diffusion.hold_given), the answers carry the given values exactly."""
    diffusion = make_diffusion(sampler=name)
    x, y = problems()
    mask = torch.rand(BATCH, D, generator=torch.Generator().manual_seed(2)) < 0.3
    given = (mask[None], y[None])
    answer = diffusion.sample(x, noise=start_noise(), inner_steps=3, given=given, generator=torch.Generator().manual_seed(0))
    assert torch.equal(answer[0][mask], y[mask])
    free = diffusion.sample(x, noise=start_noise(), inner_steps=3, generator=torch.Generator().manual_seed(0))
    assert (free[0][mask] - y[mask]).abs().max() > 0.1


@pytest.mark.parametrize("name", ["langevin", "mala"])
def test_a_noisy_sampler_draws_the_same_for_a_run_alone_or_packed(name):
    x, _ = problems()
    answers = [make_diffusion(runs=runs, sampler=name).sample_with_stats(
        x, noise=start_noise(), inner_steps=2, generator=torch.Generator().manual_seed(0)) for runs in (1, 2)]
    torch.testing.assert_close(answers[1].answer[:1], answers[0].answer)
    if name == "mala":
        torch.testing.assert_close(answers[1].stats["accept_rate_steps"][:1], answers[0].stats["accept_rate_steps"])


# -- difficulty as a knob ------------------------------------------------------------------------------------
def test_the_conditioning_keys_change_the_held_out_sets_as_stated():
    """lambda enters A = 2 U U^T + lambda I only: the same seeds give the same U, so changing task.conditioning
    moves the in-distribution conditions by exactly (lambda - lambda') I and leaves the ood set alone."""
    base = make_task({"dataset": "inverse", "rank": RANK}).held_out(16)
    harder = make_task({"dataset": "inverse", "rank": RANK, "conditioning": 0.05}).held_out(16)
    eye = torch.eye(RANK).flatten()
    torch.testing.assert_close(base["id"].x - harder["id"].x, (0.5 - 0.05) * eye.expand(16, -1), atol=1e-6, rtol=0)
    assert torch.equal(base["ood"].x, harder["ood"].x) and torch.equal(base["ood"].y, harder["ood"].y)
    a = harder["id"].x.view(-1, RANK, RANK)
    torch.testing.assert_close(a @ harder["id"].y.view(-1, RANK, RANK), torch.eye(RANK).expand_as(a), atol=1e-3, rtol=0)
    ood = make_task({"dataset": "inverse", "rank": RANK, "ood_conditioning": 0.02}).held_out(16)
    torch.testing.assert_close(base["ood"].x - ood["ood"].x, (0.1 - 0.02) * eye.expand(16, -1), atol=1e-6, rtol=0)
    assert torch.equal(base["id"].x, ood["id"].x)


def test_the_difficulty_study_sweeps_the_conditioning_of_every_arm(tmp_path):
    from conftest import ROOT
    from diffusion_lib.study.spec import expand, load_study

    runs = expand(load_study(ROOT / "configs" / "studies" / "ablations" / "difficulty.yaml"), tmp_path)
    points = {(r.strategy, r.config.task["conditioning"], r.config.task["ood_conditioning"]) for r in runs}
    strategies = {r.strategy for r in runs}
    assert points == {(s, c, 0.1) for s in strategies for c in (0.5, 0.2, 0.05)} and len(strategies) == 4
    assert all(r.config.eval.inference_steps_sweep for r in runs)


def test_the_landscape_study_scores_every_part(tmp_path):
    from conftest import ROOT
    from diffusion_lib.study.spec import expand, load_study

    runs = expand(load_study(ROOT / "configs" / "studies" / "landscape.yaml"), tmp_path)
    assert {r.strategy for r in runs} == {"none", "random", "adversarial", "adversarial_reference"}
    ev = runs[0].config.eval
    assert ev.best_of == [1, 4, 16] and ev.ranking_scales and ev.inference_steps_sweep and ev.num_samples == 64
    assert [s["name"] for s in ev.samplers] == ["langevin"] and runs[0].config.task["rank"] == 5


def test_the_connectivity_landscape_study_scores_the_quick_connectivity_arms(tmp_path):
    from conftest import ROOT
    from diffusion_lib.study.spec import expand, load_study

    runs = expand(load_study(ROOT / "configs" / "studies" / "ablations" / "landscape_connectivity.yaml"), tmp_path)
    quick = expand(load_study(ROOT / "configs" / "studies" / "quick_connectivity.yaml"), tmp_path / "quick")
    assert [(r.strategy, r.seed) for r in runs] == [(r.strategy, r.seed) for r in quick]
    ev = runs[0].config.eval
    assert runs[0].config.task["dataset"] == "connectivity" and ev.best_of == [1, 4] and ev.ranking_scales
    assert runs[0].config.train == quick[0].config.train  # the same models as quick_connectivity, scored more


# -- the trainer's final scoring -------------------------------------------------------------------------------
LANDSCAPE_ARGS = ("eval.best_of=[1,3]", "eval.ranking_scales=[0.1,1.0]", "eval.ranking_levels=[0,9]",
                  "eval.inference_steps_sweep=[0,5]", "eval.samplers=[{name: langevin, temperature: 0.01}]")


def test_the_trainer_writes_the_landscape_into_final_json(tmp_path, tiny_args):
    assert train.main(tiny_args("--train-steps", "10", *LANDSCAPE_ARGS)) == 0
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["sampler"] == {"name": "ired"}
    for suffix in ("", "_raw"):
        for name in ("id", "ood"):
            ranking = final[f"ranking_{name}{suffix}"]
            assert list(ranking) == ["sigma_0.1", "sigma_1", "samples"] and all(list(r) == ["0", "9"] for r in ranking.values())
            assert all(0 <= v <= 1 for r in ranking.values() for v in r.values())
            best = final[f"best_of_{name}{suffix}"]
            assert list(best) == ["1", "3"]
            # N = 1 is plain sampling: the pick, the random pick and the oracle are the set's score
            assert best["1"]["mse"] == {p: pytest.approx(final[f"mse_{name}{suffix}"], rel=1e-12) for p in ("energy", "random", "oracle")}
            assert best["3"]["mse"]["oracle"] <= min(best["3"]["mse"]["energy"], best["3"]["mse"]["random"])
    # FLOPs per answer: the default 5 inner steps is the sweep's 5; best-of-3 costs 3 samples and their scoring
    assert final["sampler_flops_per_answer"] == final["inference_steps_sweep_flops"]["5"] > final["inference_steps_sweep_flops"]["0"]
    assert final["best_of_id"]["1"]["flops_per_answer"] == final["sampler_flops_per_answer"]
    assert final["best_of_id"]["3"]["flops_per_answer"] > 3 * final["sampler_flops_per_answer"]
    other = final["samplers"]["langevin(temperature=0.01)"]
    assert other["sampler"] == {"name": "langevin", "temperature": 0.01, "temperature_schedule": "constant"}
    assert other["best_of_id"]["1"]["mse"]["energy"] == pytest.approx(other["mse_id"], rel=1e-12)  # same draws
    assert other["mse_id"] != final["mse_id"] and set(other["inference_steps_sweep"]) == {"0", "5"}
    # and again by --evaluate: the noisy sampler's numbers are reproducible
    assert train.main(tiny_args("--train-steps", "10", *LANDSCAPE_ARGS, "--evaluate")) == 0
    [path] = list((tmp_path / "run" / "evaluations").iterdir())
    evaluation = json.loads(path.read_text())
    assert evaluation["samplers"]["langevin(temperature=0.01)"]["mse_id"] == other["mse_id"]
    assert evaluation["ranking_ood_raw"] == final["ranking_ood_raw"]


def test_without_landscape_keys_final_json_has_none_of_them(tmp_path, tiny_args):
    assert train.main(tiny_args("--train-steps", "10")) == 0
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert not [k for k in final if k.startswith(("ranking_", "best_of_", "samplers"))]
    assert final["sampler_flops_per_answer"] > 0 and final["inference_steps_sweep_flops"] == {}


def tiny_evaluator(landscape_samples: int, hidden_dim: int = HIDDEN):
    """An Evaluator of a fresh rank-3 model (EMA and raw alike) on 12 problems a set, scored in chunks of 5."""
    config = build_config({
        "task": {"dataset": "inverse", "rank": RANK}, "model": {"hidden_dim": hidden_dim}, "device": "cpu",
        "eval": {"num_samples": 12, "batch_size": 5, "best_of": [1, 3], "ranking_scales": [0.1, 1.0],
                 "ranking_levels": [0, 9], "landscape_samples": landscape_samples},
    })
    task = create_dataset(config)
    diffusion = create_diffusion_model(config, task)
    return Evaluator(task, config, make_accelerator("cpu"), diffusion, copy.deepcopy(diffusion)), diffusion, task


def test_landscape_samples_measure_the_first_problems_as_the_full_measure_does():
    """eval.landscape_samples = 7: ranking and best-of-N are the existing measures (rank_true_answers, best_of_n)
    on the first 7 problems of each set, with the noises the full measure gives those problems; the other
    scores still cover all 12."""
    evaluator, diffusion, task = tiny_evaluator(7)
    [final] = evaluator.final_scores()
    [full] = tiny_evaluator(0)[0].final_scores()
    assert final["mse_id"] == full["mse_id"] and final["inference_steps_sweep"] == full["inference_steps_sweep"]
    for name, data in evaluator.held_out.items():
        part, seed = data.select(slice(0, 7)), zlib.crc32(name.encode())
        directions = fixed_noise(2, 12, D, mix_seed(seed, 1))[:, :7]
        samples = diffusion.sample(part.x, noise=part.noise)
        ranking = rank_true_answers(diffusion, part.x, part.y, [0.1, 1.0], directions,
                                    candidates={"samples": samples}, levels=[0, 9]).table(0)
        assert final[f"ranking_{name}"] == {d: pytest.approx(row, abs=1e-6) for d, row in ranking.items()}  # float32 means
        noises = torch.cat([part.noise[None], fixed_noise(2, 12, D, mix_seed(seed, 2))[:, :7]])
        [one, three] = best_of_n(diffusion, part.x, noises, lambda a: task.score(a, part), {"mse": False}, [1, 3])
        for result, table in ((one, final[f"best_of_{name}"]["1"]), (three, final[f"best_of_{name}"]["3"])):
            expected = {"energy": result.energy_pick, "random": result.random_pick, "oracle": result.oracle}
            assert table["mse"] == {p: pytest.approx(v["mse"][0].double().mean().item(), rel=1e-6) for p, v in expected.items()}
        assert final[f"best_of_{name}"] != full[f"best_of_{name}"]  # all 12 problems give other means


@pytest.mark.parametrize("value, problem", [(-1, "is out of range: must be an int in [0, 1048576]"),
                                            (2**20 + 1, "is out of range: must be an int in [0, 1048576]"),
                                            (1.5, "has the wrong type: expected int")])
def test_landscape_samples_is_validated_in_one_line(value, problem):
    with pytest.raises(ConfigError) as error:
        build_config({"eval": {"landscape_samples": value}})
    assert str(error.value) == f"config key 'eval.landscape_samples' = {value} {problem}"


def test_sampling_flops_are_counted_once_per_setup(monkeypatch):
    """FLOPs per answer depend on shapes only: a second evaluator of the same setup reuses the counts (equal
    to a fresh count), another model size counts its own."""
    counted = []
    monkeypatch.setattr(evaluate, "SAMPLING_FLOPS", {})
    monkeypatch.setattr(evaluate, "sampling_flops", lambda *a, **k: counted.append(a[3]) or sampling_flops(*a, **k))
    first = tiny_evaluator(0)[0]._sampling_flops(None, [5, 0, 5, 2])
    assert counted == [5, 0, 2]
    assert tiny_evaluator(0)[0]._sampling_flops(None, [2, 5]) == [first[3], first[0]] and counted == [5, 0, 2]
    wider = tiny_evaluator(0, hidden_dim=2 * HIDDEN)[0]._sampling_flops(None, [5])
    assert counted == [5, 0, 2, 5] and wider[0] > first[0]
