import pytest
import torch

from diffusion_lib import EBM, GaussianDiffusion1D, EnergyDenoiser, resolve_mining_config
from diffusion_lib.mining import STRATEGIES


def make_diffusion(mining_config=None, dim=9, hidden=64, seed=0, **kwargs):
    torch.manual_seed(seed)
    return GaussianDiffusion1D(EnergyDenoiser(EBM(dim, dim, hidden_dim=hidden)), mining_config=mining_config, **kwargs)


def batch(n=32, dim=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g).clamp(-2, 2)


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
    assert "loss_energy" not in stats and stats["grad_evals"] == 1.0
    assert (counter.with_grad, counter.without_grad) == (1, 0)  # the score pass only


def test_random_evaluates_no_energy_gradient_while_mining(monkeypatch):
    diffusion = make_diffusion({"strategy": "random"})
    counter = CountingModel(diffusion, monkeypatch)
    x, y = batch()
    loss, stats = diffusion(x, y, generator=torch.Generator().manual_seed(0))
    # one gradient pass for the score loss, one energy-only pass for E+ and E-: none for mining
    assert (counter.with_grad, counter.without_grad) == (1, 1)
    assert loss.item() == pytest.approx((stats["loss_denoise"] + 0.5 * stats["loss_energy"]).item(), rel=1e-6)


@pytest.mark.parametrize("opt_steps", [1, 2, 5])
def test_adversarial_takes_exactly_opt_steps_and_never_raises_energy(monkeypatch, opt_steps):
    diffusion = make_diffusion({"strategy": "adversarial", "opt_steps": opt_steps, "scale_factor": 50.0})
    calls = []
    original = diffusion.opt_step

    def spy(cond, y, t, steps, scale=1.0):
        counter = CountingModel(diffusion, monkeypatch)
        result, accept = original(cond, y, t, steps, scale)
        monkeypatch.undo()
        start_energy, _ = diffusion.model.energy_and_grad(cond, y, need_grad=False)
        end_energy, _ = diffusion.model.energy_and_grad(cond, result, need_grad=False)
        calls.append((steps, scale, counter.with_grad, counter.without_grad, start_energy, end_energy, accept))
        return result, accept

    monkeypatch.setattr(diffusion, "opt_step", spy)
    x, y = batch()
    diffusion(x, y, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 1
    steps, scale, with_grad, without_grad, start, end, accept = calls[0]
    assert (steps, scale) == (opt_steps, 50.0)
    # opt_steps gradients and one energy per proposal (the last proposal needs no gradient)
    assert with_grad == opt_steps and without_grad == 1
    assert torch.all(end <= start + 1e-6), "a sample ended at a higher energy than it started"
    assert 0.0 <= float(accept) <= 1.0


def test_opt_step_rejects_energy_raising_steps_per_sample():
    diffusion = make_diffusion()
    x, y = batch(64)
    t = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(2))
    cond = diffusion.condition(x, t)
    scale = 200.0  # big enough that some steps overshoot and raise the energy
    energy, grad = diffusion.model.energy_and_grad(cond, y)
    bound = 2 * diffusion.sqrt_alphas_cumprod[t].unsqueeze(-1)
    proposal = torch.maximum(torch.minimum(y - diffusion.opt_step_size[t].unsqueeze(-1) * scale * grad, bound), -bound)
    new_energy, _ = diffusion.model.energy_and_grad(cond, proposal, need_grad=False)
    raised = (new_energy > energy).squeeze(-1)
    assert raised.any() and (~raised).any(), "the test needs both accepted and rejected samples"
    result, accept = diffusion.opt_step(cond, y, t, steps=1, scale=scale)
    assert torch.equal(result[raised], y[raised])
    assert torch.allclose(result[~raised], proposal[~raised])
    assert float(accept) == pytest.approx((~raised).float().mean().item())


def test_opt_step_clamps_to_each_samples_own_bound():
    diffusion = make_diffusion()
    x, y = batch(40)
    t = torch.arange(40) % 10  # the first sample has t = 0 (the loosest bound): a batch-wide bound would leak
    y = y * 5
    cond = diffusion.condition(x, t)
    # energy rejection would hide the clamp, so test the bound on every proposal: one step from outside
    result, _ = diffusion.opt_step(cond, y, t, steps=3, scale=100.0)
    bound = 2 * diffusion.sqrt_alphas_cumprod[t].unsqueeze(-1)
    moved = (result != y).any(dim=-1)
    assert moved.any()
    assert torch.all(result[moved].abs() <= bound[moved] + 1e-6)
    assert (result[moved].abs() >= bound[moved] - 1e-6).any(), "some moved samples should sit on their bound"
    tight = moved & (t >= 5)
    assert tight.any() and torch.all(result[tight].abs() <= bound[tight] + 1e-6)


def test_explicit_gradient_matches_autograd():
    diffusion = make_diffusion()
    x, y = batch()
    t = torch.randint(0, 10, (32,))
    y = y.clone().requires_grad_(True)
    energy = diffusion.model.energy(x, y, t, 10)
    (expected,) = torch.autograd.grad(energy.sum(), y)
    _, grad = diffusion.model.energy_and_grad(diffusion.condition(x, t), y)
    assert torch.allclose(grad, expected, atol=1e-6, rtol=1e-4)


def test_mixed_and_periodic_spend_gradients_as_configured():
    x, y = batch(32)
    mixed = make_diffusion({"strategy": "mixed", "fraction": 0.25})
    _, stats = mixed(x, y, generator=torch.Generator().manual_seed(0))
    assert stats["grad_evals"] == pytest.approx(1 + 0.25 * 2)
    periodic = make_diffusion({"strategy": "periodic", "every": 4})
    assert periodic(x, y, step=8, generator=torch.Generator())[1]["grad_evals"] == 3.0
    assert periodic(x, y, step=9, generator=torch.Generator())[1]["grad_evals"] == 1.0


def test_mining_config_defaults_and_reference_flags():
    assert resolve_mining_config(None, supervise_energy_landscape=False)["strategy"] == "none"
    derived = resolve_mining_config(None, supervise_energy_landscape=True)
    assert derived == {"strategy": "adversarial", "opt_steps": 2, "scale_factor": 1.0, "noise_scale": 3.0, "loss_scale": 0.5}
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
    ],
)
def test_bad_mining_config_is_refused_by_name(config, fragment):
    with pytest.raises(ValueError) as error:
        make_diffusion(config)
    assert fragment in str(error.value)
