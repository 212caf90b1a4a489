"""The library computes the same numbers as straightforward implementations of the spec and of the
published code.

`tests/straightforward.py` shares the library's EBM weights but does everything the plain way
(time MLP per sample, fc1 on cat([x, y]), autograd with create_graph=True, a separate energy forward
for each rejection test). Both paths get the same inputs, t and noises (the same generator seed), so
losses, parameter gradients, mined negatives, opt_step results and samples must agree to float32
tolerance for every strategy. The published code's rules (configs/runs/reference_faithful.yaml) are written
out below, in float64, and must agree too.
"""
from types import SimpleNamespace

import pytest
import torch

import straightforward as plain
import train
from conftest import ROOT
from diffusion_lib import EBM, EnergyDenoiser, GaussianDiffusion1D
from diffusion_lib.harness.config import config_from_file
from diffusion_lib.mining import resolve_mining_config
from diffusion_lib.tasks.base import make_task

RANK, HIDDEN, BATCH = 3, 64, 48
STRATEGIES = ["none", "random", "adversarial"]
TOL = dict(rtol=1e-4, atol=1e-5)
TOL64 = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls gain nothing from a second thread, and on a busy 2-core machine every parallel
    region can wait a whole scheduler tick for it: one thread keeps this file at a few seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_diffusion(strategy: str, seed: int = 0, **mining) -> GaussianDiffusion1D:
    ebm = EBM(SimpleNamespace(inp_dim=RANK * RANK, out_dim=RANK * RANK), hidden_dim=HIDDEN)
    ebm.init_run(0, seed)
    return GaussianDiffusion1D(EnergyDenoiser(ebm), mining_config=resolve_mining_config({"strategy": strategy, **mining}))


def problems(batch: int = BATCH, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return make_task({"dataset": "inverse", "rank": RANK}).sample(batch, torch.Generator().manual_seed(seed))[:2]


def param_grads(diffusion: GaussianDiffusion1D, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    names, params = zip(*[(n, p) for n, p in diffusion.named_parameters() if p.requires_grad])
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for n, p, g in zip(names, params, grads)}


def draw_t(batch: int = BATCH, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(seed))


def test_energy_and_input_gradient_match():
    diffusion = make_diffusion("none")
    ebm = diffusion.model.ebm
    x, y = problems()
    t = draw_t()
    energy, grad = ebm.energy_and_grad(diffusion.condition(x[None], t[None]), y[None])
    energy_plain, grad_plain = plain.plain_energy_and_grad(ebm, x, y, t)
    torch.testing.assert_close(energy[0], energy_plain, **TOL)
    torch.testing.assert_close(grad[0], grad_plain, **TOL)
    torch.testing.assert_close(ebm(x[None], y[None], t[None], diffusion.num_timesteps)[0], energy_plain, **TOL)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_loss_and_parameter_gradients_match(strategy):
    diffusion = make_diffusion(strategy)
    x, y = problems()
    loss, _ = diffusion(x, y, generator=torch.Generator().manual_seed(3))
    loss_plain = plain.plain_loss(diffusion, x, y, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(loss, loss_plain, **TOL)
    grads, grads_plain = param_grads(diffusion, loss), param_grads(diffusion, loss_plain)
    assert grads.keys() == grads_plain.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_plain[name], **TOL, msg=lambda m: f"{name}: {m}")
    # every parameter of the energy model gets a gradient (the time path included)
    assert all(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("strategy", ["random", "adversarial"])
def test_mined_negatives_match(strategy):
    diffusion = make_diffusion(strategy, opt_steps=3, scale_factor=1.5)
    x, y0 = problems()
    g = torch.Generator().manual_seed(4)
    t = torch.randint(0, diffusion.num_timesteps, (BATCH,), generator=g)
    noise_pos = torch.randn(y0.shape, generator=g)
    cond = diffusion.condition(x[None], t[None]).detach()
    mined = diffusion.strategy.mine(diffusion, cond, y0[None], t[None], noise_pos[None], diffusion.mining_config, 0).y
    torch.testing.assert_close(mined[0], plain.plain_negatives(diffusion, x, y0, t, noise_pos), **TOL)
    assert not mined.requires_grad


@pytest.mark.parametrize(
    "steps, scale, data_bound, start",
    # the last case moves the clamp out of the way, so big steps overshoot and are rejected mid-way:
    # it checks that a rejected sample restarts from its old point *and gradient*
    [(1, 1.0, 2.0, 2.0), (2, 1.0, 2.0, 2.0), (5, 2.0, 2.0, 2.0), (5, 50.0, 100.0, 1.0)],
)
def test_opt_step_matches(steps, scale, data_bound, start):
    diffusion = make_diffusion("adversarial")
    diffusion.data_bound = data_bound
    x, _ = problems()
    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, diffusion.num_timesteps, (BATCH,), generator=g)  # per-sample t: per-sample bounds
    y = start * torch.randn(BATCH, RANK * RANK, generator=g)
    result = diffusion.opt_step(diffusion.condition(x[None], t[None]), y[None], t[None], steps, scale)
    torch.testing.assert_close(result.y[0], plain.plain_opt_step(diffusion, x, y, t, steps, scale), **TOL)
    assert 0.0 < float(result.accepted.mean()) < 1.0  # some steps rejected, some accepted: both branches compared


@pytest.mark.parametrize("inner_steps", [0, 5])
def test_samples_match(inner_steps):
    diffusion = make_diffusion("adversarial")
    x, _ = problems()
    noise = torch.randn(BATCH, RANK * RANK, generator=torch.Generator().manual_seed(6))
    fast = diffusion.sample(x, noise=noise, inner_steps=inner_steps)
    torch.testing.assert_close(fast[0], plain.plain_sample(diffusion, x, noise, inner_steps), **TOL)


def test_numpy_loader_matches_task_distribution():
    """The baseline's per-sample numpy data are the same task: y is A^-1 for A = 2 U U^T + 0.5 I."""
    x, y = next(iter(plain.numpy_loader(RANK, 16)))
    a, a_inv = x.view(16, RANK, RANK).double(), y.view(16, RANK, RANK).double()
    torch.testing.assert_close(a @ a_inv, torch.eye(RANK, dtype=torch.float64).expand(16, -1, -1), rtol=0, atol=1e-4)
    torch.testing.assert_close(a, a.transpose(-1, -2))


# -- the published code's rules, written out -------------------------------------------------------------
def reference_opt_step(diffusion, x, y, t, steps, scale):
    """The published inner loop: the first step at eta_t * scale, later ones at eta_t * 2 (its step-scale
    variable is reused as the clamp factor); the clamp bound of the batch's first sample for everyone; a
    separate energy forward decides acceptance."""
    ebm = diffusion.model.ebm
    bound = diffusion.data_bound * diffusion.sqrt_alphas_cumprod[t[0]]
    eta = diffusion.opt_step_size[t].unsqueeze(-1)
    for i in range(steps):
        energy, grad = plain.plain_energy_and_grad(ebm, x, y, t)
        proposal = torch.clamp(y - eta * (scale if i == 0 else 2.0) * grad, -bound, bound)
        y = torch.where(plain.plain_energy(ebm, x, proposal, t) > energy, y, proposal).detach()
    return y


def reference_loss(diffusion, x, y0, generator):
    cfg, ebm = diffusion.mining_config, diffusion.model.ebm
    t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), generator=generator)
    # drawn in float32 and widened, as the library draws them whatever the model's dtype
    noise, noise_pos = (torch.randn(y0.shape, generator=generator).to(y0.dtype) for _ in range(2))
    _, eps_hat = plain.plain_energy_and_grad(ebm, x, plain.q_sample(diffusion, y0, t, noise), t)
    start = plain.q_sample(diffusion, y0, t, cfg["noise_scale"] * noise_pos)
    y_neg = reference_opt_step(diffusion, x, start, t, cfg["opt_steps"], cfg["scale_factor"])
    x0_neg = plain.x0_from_noise(diffusion, y_neg, t, 0.0).clamp(-2, 2)
    e_pos = plain.plain_energy(ebm, x, plain.q_sample(diffusion, y0, t, noise_pos), t)
    e_neg = plain.plain_energy(ebm, x, plain.q_sample(diffusion, x0_neg, t, noise_pos), t)
    loss_energy = torch.nn.functional.softplus(e_pos - e_neg).squeeze(-1)
    return ((eps_hat - noise).pow(2).mean(-1) + cfg["loss_scale"] * loss_energy).mean(), y_neg


def reference_sample(diffusion, x, noise):
    """The published sampler: inner steps by the same x2 rule; the answer sqrt(abar_0) * x0."""
    ebm, y = diffusion.model.ebm, noise
    for step in reversed(range(diffusion.num_timesteps)):
        t = torch.full((x.shape[0],), step)
        _, eps_hat = plain.plain_energy_and_grad(ebm, x, y, t)
        scale_t = diffusion.sqrt_alphas_cumprod[step]
        y = scale_t * plain.x0_from_noise(diffusion, y, t, eps_hat.detach()).clamp(-2, 2)
        y = reference_opt_step(diffusion, x, y, t, diffusion.inference_steps, diffusion.inference_step_scale)
        x0 = y.clamp(-2 * scale_t, 2 * scale_t) / scale_t
        y = diffusion.sqrt_alphas_cumprod[step - 1] * x0 if step > 0 else y
    return diffusion.sqrt_alphas_cumprod[0] * x0.detach()


@pytest.fixture
def faithful():
    """configs/runs/reference_faithful.yaml's model at test size, in float64 (the comparison is exact up to rounding)."""
    config = config_from_file(ROOT / "configs" / "runs" / "reference_faithful.yaml")
    config.task["rank"], config.model["hidden_dim"] = RANK, HIDDEN
    assert config.mining["step_schedule"] == "reference" and config.mining["clamp_bound"] == "first_sample"
    task = train.create_dataset(config)
    return train.create_diffusion_model(config, task).double()


@pytest.mark.parametrize("seed", [3, 8])
def test_reference_faithful_config_reproduces_the_published_training_step(faithful, seed):
    x, y = (v.double() for v in problems())
    loss, stats = faithful(x, y, generator=torch.Generator().manual_seed(seed))
    loss_ref, _ = reference_loss(faithful, x, y, torch.Generator().manual_seed(seed))
    torch.testing.assert_close(loss, loss_ref, **TOL64)
    grads, grads_ref = param_grads(faithful, loss), param_grads(faithful, loss_ref)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], **TOL64, msg=lambda m: f"{name}: {m}")
    assert float(stats["accept_rate_steps"][0, 1]) < 1.0  # the doubled second step overshoots for some samples


def test_reference_faithful_config_reproduces_the_published_negatives_and_samples(faithful):
    x, y0 = (v.double() for v in problems())
    g = torch.Generator().manual_seed(4)
    t = torch.randint(0, 10, (BATCH,), generator=g)
    t[0] = 9  # the first sample's t sets everyone's clamp bound: the tightest one makes the quirk visible
    noise_pos = torch.randn(y0.shape, generator=g, dtype=torch.float64)
    cfg = faithful.mining_config
    start = plain.q_sample(faithful, y0, t, cfg["noise_scale"] * noise_pos)
    cond = faithful.condition(x[None], t[None])
    mined = faithful.strategy.mine(faithful, cond, y0[None], t[None], noise_pos[None], cfg, 0).y[0]
    expected = reference_opt_step(faithful, x, start, t, cfg["opt_steps"], cfg["scale_factor"])
    torch.testing.assert_close(mined, expected, **TOL64)
    moved = (mined != start).any(dim=-1)  # every accepted step lands inside the first sample's (t = 9) bound
    assert moved.sum() > BATCH // 4 and mined[moved].abs().max() <= 2 * faithful.sqrt_alphas_cumprod[9] + 1e-12
    noise = torch.randn(BATCH, RANK * RANK, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    torch.testing.assert_close(faithful.sample(x, noise=noise)[0], reference_sample(faithful, x, noise), **TOL64)
