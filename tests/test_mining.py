"""Mining strategies and opt_step: what each spends, what each does, the published code's switches."""
from types import SimpleNamespace

import pytest
import torch

from diffusion_lib import EBM, GaussianDiffusion1D, EnergyDenoiser, resolve_mining_config
from diffusion_lib.mining import STRATEGIES

DIM = 9


def make_diffusion(mining_config=None, dim=DIM, hidden=64, seed=0, runs=1, **kwargs):
    ebm = EBM(SimpleNamespace(inp_dim=dim, out_dim=dim), hidden_dim=hidden, runs=runs)
    for run in range(runs):
        ebm.init_run(run, seed + run)
    resolved = None if mining_config is None else resolve_mining_config(mining_config)  # as the run config does
    return GaussianDiffusion1D(EnergyDenoiser(ebm), mining_config=resolved, **kwargs)


def batch(n=32, dim=DIM, seed=1):
    """One run's batch, packed: [1, n, dim]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, n, dim, generator=g), torch.randn(1, n, dim, generator=g).clamp(-2, 2)


def timesteps(n, seed=2):
    return torch.randint(0, 10, (1, n), generator=torch.Generator().manual_seed(seed))


class CountingModel:
    """Counts energy_and_grad calls of a diffusion's model, split by whether a gradient was asked."""

    def __init__(self, diffusion, monkeypatch):
        self.with_grad = self.without_grad = 0
        original = diffusion.model.energy_and_grad

        def counted(cond, y, need_grad=True):
            if need_grad:
                self.with_grad += 1
            else:
                self.without_grad += 1
            return original(cond, y, need_grad)

        monkeypatch.setattr(diffusion.model, "energy_and_grad", counted)


def test_none_adds_no_energy_term(monkeypatch):
    diffusion = make_diffusion({"strategy": "none"})
    counter = CountingModel(diffusion, monkeypatch)
    x, y = batch()
    loss, stats = diffusion(x, y, generator=torch.Generator().manual_seed(0))
    assert loss.item() == stats["loss_denoise"].item()
    assert "loss_energy" not in stats and stats["energy_grad_evals"] == 1.0
    assert (counter.with_grad, counter.without_grad) == (1, 0)  # the score pass only


def test_random_evaluates_no_energy_gradient_while_mining(monkeypatch):
    diffusion = make_diffusion({"strategy": "random"})
    counter = CountingModel(diffusion, monkeypatch)
    x, y = batch()
    loss, stats = diffusion(x, y, generator=torch.Generator().manual_seed(0))
    # one gradient pass for the score loss, one energy-only pass for E+ and E-: none for mining
    assert (counter.with_grad, counter.without_grad) == (1, 1)
    assert loss.item() == pytest.approx((stats["loss_denoise"] + 0.5 * stats["loss_energy"]).item(), rel=1e-6)
    assert "accept_rate" not in stats


@pytest.mark.parametrize("opt_steps", [1, 2, 5])
def test_adversarial_takes_exactly_opt_steps_and_never_raises_energy(monkeypatch, opt_steps):
    diffusion = make_diffusion({"strategy": "adversarial", "opt_steps": opt_steps, "scale_factor": 50.0})
    calls = []
    original = diffusion.opt_step

    def spy(cond, y, t, steps, scale=1.0, **options):
        counter = CountingModel(diffusion, monkeypatch)
        result = original(cond, y, t, steps, scale, **options)
        monkeypatch.undo()
        start_energy, _ = diffusion.model.energy_and_grad(cond, y, need_grad=False)
        end_energy, _ = diffusion.model.energy_and_grad(cond, result.y, need_grad=False)
        calls.append((steps, scale, counter.with_grad, counter.without_grad, start_energy, end_energy, result))
        return result

    monkeypatch.setattr(diffusion, "opt_step", spy)
    x, y = batch()
    _, stats = diffusion(x, y, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 1
    steps, scale, with_grad, without_grad, start, end, result = calls[0]
    assert (steps, scale) == (opt_steps, 50.0)
    # opt_steps gradients and one energy per proposal (the last proposal needs no gradient)
    assert with_grad == opt_steps and without_grad == 1
    assert torch.all(end <= start + 1e-6), "a sample ended at a higher energy than it started"
    torch.testing.assert_close(result.energy, end)
    torch.testing.assert_close(result.energy_start, start)
    # the logged statistics describe that descent
    assert stats["accept_rate_steps"].shape == (1, opt_steps)
    assert torch.all((stats["accept_rate_steps"] >= 0) & (stats["accept_rate_steps"] <= 1))
    assert stats["energy_decrease"].item() == pytest.approx((start - end).mean().item(), rel=1e-5, abs=1e-7)
    assert stats["energy_decrease"].item() >= 0


def test_opt_step_rejects_energy_raising_steps_per_sample():
    diffusion = make_diffusion()
    x, y = batch(64)
    t = timesteps(64)
    cond = diffusion.condition(x, t)
    scale = 200.0  # big enough that some steps overshoot and raise the energy
    energy, grad = diffusion.model.energy_and_grad(cond, y)
    bound = 2 * diffusion.sqrt_alphas_cumprod[t].unsqueeze(-1)
    proposal = torch.maximum(torch.minimum(y - diffusion.opt_step_size[t].unsqueeze(-1) * scale * grad, bound), -bound)
    new_energy, _ = diffusion.model.energy_and_grad(cond, proposal, need_grad=False)
    raised = (new_energy > energy).squeeze(-1)
    assert raised.any() and (~raised).any(), "the test needs both accepted and rejected samples"
    result = diffusion.opt_step(cond, y, t, steps=1, scale=scale)
    assert torch.equal(result.y[raised], y[raised])
    assert torch.allclose(result.y[~raised], proposal[~raised])
    assert result.accepted.shape == (1, 1)
    assert float(result.accepted) == pytest.approx((~raised).float().mean().item())


def test_opt_step_clamps_to_each_samples_own_bound():
    diffusion = make_diffusion()
    x, y = batch(40)
    t = (torch.arange(40) % 10).unsqueeze(0)  # the first sample has t = 0 (the loosest bound)
    y = y * 5
    cond = diffusion.condition(x, t)
    # energy rejection would hide the clamp, so test the bound on every proposal: one step from outside
    result = diffusion.opt_step(cond, y, t, steps=3, scale=100.0).y
    bound = 2 * diffusion.sqrt_alphas_cumprod[t].unsqueeze(-1)
    moved = (result != y).any(dim=-1)
    assert moved.any()
    assert torch.all(result[moved].abs() <= bound[moved] + 1e-6)
    assert (result[moved].abs() >= bound[moved] - 1e-6).any(), "some moved samples should sit on their bound"
    tight = moved & (t >= 5)
    assert tight.any() and torch.all(result[tight].abs() <= bound[tight] + 1e-6)


def test_first_sample_clamp_bound_uses_the_first_samples_t_for_the_whole_batch():
    diffusion = make_diffusion()
    x, y = batch(40)
    t = 9 - (torch.arange(40) % 10).unsqueeze(0)  # the first sample has t = 9: the tightest bound
    y = y * 5
    cond = diffusion.condition(x, t)
    result = diffusion.opt_step(cond, y, t, steps=3, scale=100.0, clamp_bound="first_sample").y
    first_bound = 2 * diffusion.sqrt_alphas_cumprod[9].item()
    moved = (result != y).any(dim=-1)
    loose = moved & (t < 5)  # these samples' own bound would be far looser
    assert loose.any() and torch.all(result[loose].abs() <= first_bound + 1e-6)


def test_reference_schedule_doubles_every_step_after_the_first():
    """Two steps by hand: the first at eta_t * scale, the second at eta_t * 2 whatever the scale."""
    diffusion = make_diffusion()
    x, y = batch(64)
    t = timesteps(64)
    cond = diffusion.condition(x, t)
    eta = diffusion.opt_step_size[t].unsqueeze(-1)
    bound = 2 * diffusion.sqrt_alphas_cumprod[t].unsqueeze(-1)
    y_now = y
    energy, grad = diffusion.model.energy_and_grad(cond, y_now)
    for scale in (0.25, 2.0):  # step 1 at the given scale, step 2 at 2
        proposal = torch.maximum(torch.minimum(y_now - eta * scale * grad, bound), -bound)
        new_energy, new_grad = diffusion.model.energy_and_grad(cond, proposal)
        keep = new_energy <= energy
        y_now, energy, grad = torch.where(keep, proposal, y_now), torch.where(keep, new_energy, energy), torch.where(keep, new_grad, grad)
    result = diffusion.opt_step(cond, y, t, steps=2, scale=0.25, schedule="reference").y
    torch.testing.assert_close(result, y_now)
    constant = diffusion.opt_step(cond, y, t, steps=2, scale=0.25, schedule="constant").y
    assert not torch.allclose(constant, result), "with the constant schedule the second step is smaller"


def test_explicit_gradient_matches_autograd():
    diffusion = make_diffusion()
    x, y = batch()
    t = timesteps(32)
    y = y.clone().requires_grad_(True)
    energy = diffusion.model.energy(x, y, t, 10)
    (expected,) = torch.autograd.grad(energy.sum(), y)
    with torch.no_grad():  # the graph-free path (mining, sampling) ...
        _, grad = diffusion.model.energy_and_grad(diffusion.condition(x, t), y)
    assert torch.allclose(grad, expected, atol=1e-6, rtol=1e-4)
    _, grad = diffusion.model.energy_and_grad(diffusion.condition(x, t), y)  # ... and the recorded one
    assert torch.allclose(grad, expected, atol=1e-6, rtol=1e-4)


def test_mixed_and_periodic_spend_gradients_as_configured():
    x, y = batch(32)
    mixed = make_diffusion({"strategy": "mixed", "fraction": 0.25})
    _, stats = mixed(x, y, generator=torch.Generator().manual_seed(0))
    assert stats["energy_grad_evals"] == pytest.approx(1 + 0.25 * 2)
    periodic = make_diffusion({"strategy": "periodic", "every": 4})
    assert periodic(x, y, step=8, generator=torch.Generator())[1]["energy_grad_evals"] == 3.0
    _, random_step = periodic(x, y, step=9, generator=torch.Generator())
    assert random_step["energy_grad_evals"] == 1.0 and "accept_rate" not in random_step
    assert STRATEGIES["periodic"].period({"every": 4}) == 4 and STRATEGIES["adversarial"].period({}) == 1


@pytest.mark.parametrize("strategy", ["none", "random", "adversarial", "mixed"])
def test_a_pack_computes_what_each_run_computes_alone(strategy):
    """Two runs packed: the loss is the sum of the lone runs' losses, each run's gradient its own."""
    config = {"strategy": strategy}
    pack = make_diffusion(config, seed=3, runs=2)
    alone = [make_diffusion(config, seed=3 + run) for run in range(2)]
    xs, ys = zip(*(batch(16, seed=10 + run) for run in range(2)))
    seeds = [20, 21]
    loss, stats = pack(torch.cat(xs), torch.cat(ys), generator=[torch.Generator().manual_seed(s) for s in seeds])
    loss.backward()
    for run, model in enumerate(alone):
        lone_loss, lone_stats = model(xs[run], ys[run], generator=torch.Generator().manual_seed(seeds[run]))
        lone_loss.backward()
        assert stats["loss"][run].item() == pytest.approx(lone_loss.item(), rel=1e-5)
        for key, value in lone_stats.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(stats[key][run], value[0], rtol=1e-5, atol=1e-6)
        for (name, p), (_, q) in zip(pack.named_parameters(), model.named_parameters()):
            torch.testing.assert_close(p.grad[run], q.grad[0], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_mining_config_defaults_and_reference_flags():
    assert resolve_mining_config(None, supervise_energy_landscape=False)["strategy"] == "none"
    derived = resolve_mining_config(None, supervise_energy_landscape=True)
    assert derived == {"strategy": "adversarial", "opt_steps": 2, "scale_factor": 1.0, "noise_scale": 3.0,
                       "loss_scale": 0.5, "start": "corrupt", "corrupt_fraction": 0.05, "corruption": "published",
                       "step_schedule": "constant", "clamp_bound": "per_sample"}
    assert make_diffusion(use_innerloop_opt=False).inference_steps == 0
    assert make_diffusion().inference_steps == 5
    assert set(STRATEGIES) >= {"none", "random", "adversarial", "periodic", "mixed"}


@pytest.mark.parametrize(
    "config, fragment",
    [
        ({"strategy": "adverserial"}, "(did you mean 'adversarial'?); allowed: none, random, adversarial"),
        ({"strategy": "adversarial", "opt_step": 2}, "unknown key 'opt_step'"),
        ({"strategy": "random", "every": 2}, "unknown key 'every' for strategy 'random'"),
        ({"strategy": "adversarial", "opt_steps": 0}, "'opt_steps'] = 0 is invalid: must be an int >= 1"),
        ({"strategy": "adversarial", "opt_steps": 2.5}, "'opt_steps'] = 2.5"),
        ({"strategy": "adversarial", "scale_factor": 0}, "must be a float > 0"),
        ({"strategy": "mixed", "fraction": 1.5}, "must be a float in [0, 1]"),
        ({"strategy": "adversarial", "step_schedule": "doubled"}, "must be one of constant, reference"),
        ({"strategy": "adversarial", "clamp_bound": "first"}, "must be one of per_sample, first_sample"),
    ],
)
def test_bad_mining_config_is_refused_by_name(config, fragment):
    with pytest.raises(ValueError) as error:
        make_diffusion(config)
    assert fragment in str(error.value)
