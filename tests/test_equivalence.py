"""The fast library path computes the same numbers as the straightforward implementation of the spec.

`benchmarks/straightforward.py` shares the library's EBM weights but does everything the plain way
(time MLP per sample, fc1 on cat([x, y]), autograd with create_graph=True, a separate energy forward
for each rejection test). Both paths get the same inputs, t and noises (the same generator seed), so
losses, parameter gradients, mined negatives, opt_step results and samples must agree to float32
tolerance for every strategy.
"""
import os

import pytest
import torch

from benchmarks import straightforward as plain
from diffusion_lib import EBM, EnergyCondition, EnergyDenoiser, GaussianDiffusion1D, models
from diffusion_lib.tasks import make_task

RANK, HIDDEN, BATCH = 3, 64, 48
STRATEGIES = ["none", "random", "adversarial"]
TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls gain nothing from a second thread, and on a busy 2-core machine every parallel
    region can wait a whole scheduler tick for it: one thread keeps this file at a few seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_diffusion(strategy: str, seed: int = 0, **mining) -> GaussianDiffusion1D:
    torch.manual_seed(seed)
    ebm = EBM(RANK * RANK, RANK * RANK, hidden_dim=HIDDEN)
    return GaussianDiffusion1D(EnergyDenoiser(ebm), mining_config={"strategy": strategy, **mining})


def problems(batch: int = BATCH, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return make_task("inverse", RANK).sample(batch, torch.Generator().manual_seed(seed))


def param_grads(diffusion: GaussianDiffusion1D, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    names, params = zip(*[(n, p) for n, p in diffusion.named_parameters() if p.requires_grad])
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for n, p, g in zip(names, params, grads)}


def test_energy_and_input_gradient_match():
    diffusion = make_diffusion("none")
    ebm = diffusion.model.ebm
    x, y = problems()
    t = torch.randint(0, diffusion.num_timesteps, (BATCH,), generator=torch.Generator().manual_seed(2))
    energy, grad = ebm.energy_and_grad(diffusion.condition(x, t), y)
    energy_plain, grad_plain = plain.plain_energy_and_grad(ebm, x, y, t)
    torch.testing.assert_close(energy, energy_plain, **TOL)
    torch.testing.assert_close(grad, grad_plain, **TOL)
    torch.testing.assert_close(ebm(x, y, t, diffusion.num_timesteps), energy_plain, **TOL)


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
    cond = diffusion.condition(x, t).detach()
    mined = diffusion.strategy.mine(diffusion, cond, y0, t, noise_pos, diffusion.mining_config, 0).y
    torch.testing.assert_close(mined, plain.plain_negatives(diffusion, x, y0, t, noise_pos), **TOL)
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
    fast, accept_rate = diffusion.opt_step(diffusion.condition(x, t), y, t, steps, scale)
    torch.testing.assert_close(fast, plain.plain_opt_step(diffusion, x, y, t, steps, scale), **TOL)
    assert 0.0 < float(accept_rate) < 1.0  # some steps rejected, some accepted: both branches compared


@pytest.mark.parametrize("inner_steps", [0, 5])
def test_samples_match(inner_steps):
    diffusion = make_diffusion("adversarial")
    x, _ = problems()
    noise = torch.randn(BATCH, RANK * RANK, generator=torch.Generator().manual_seed(6))
    fast = diffusion.sample(x, noise=noise, inner_steps=inner_steps)
    torch.testing.assert_close(fast, plain.plain_sample(diffusion, x, noise, inner_steps), **TOL)


def test_numpy_loader_matches_task_distribution():
    """The baseline's per-sample numpy data are the same task: y is A^-1 for A = 2 U U^T + 0.5 I."""
    x, y = next(iter(plain.numpy_loader(RANK, 16)))
    a, a_inv = x.view(16, RANK, RANK).double(), y.view(16, RANK, RANK).double()
    torch.testing.assert_close(a @ a_inv, torch.eye(RANK, dtype=torch.float64).expand(16, -1, -1), rtol=0, atol=1e-4)
    torch.testing.assert_close(a, a.transpose(-1, -2))


@pytest.mark.parametrize("need_grad", [True, False])
def test_hand_derived_backward_passes_gradcheck(need_grad):
    """The custom Function's backward (second order for G = grad_y E) against finite differences, in
    float64, for every input: y (stacked [2, B, D] as in the energy loss), the condition, the weights."""
    torch.manual_seed(7)
    batch, dim, hidden = 3, 4, 8
    ebm = EBM(dim, dim, hidden_dim=hidden, time_dim=8).double()
    # gradcheck perturbs its inputs in place, so passing the parameters themselves checks their gradients
    params = [ebm.fc1.weight, ebm.fc2.weight, ebm.fc2.bias, ebm.fc3.weight, ebm.fc3.bias, ebm.fc4.weight, ebm.fc4.bias]
    y = torch.randn(2, batch, dim, dtype=torch.float64, requires_grad=True)
    cond = [torch.randn(batch, hidden, dtype=torch.float64, requires_grad=True) for _ in range(5)]

    def outputs(y, *tensors):
        energy, grad = ebm.energy_and_grad(EnergyCondition(*tensors[:5]), y, need_grad=need_grad)
        return (energy, grad) if need_grad else energy

    assert torch.autograd.gradcheck(outputs, (y, *cond, *params), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.fixture
def fresh_kernels():
    """No compiled wrapper left over from elsewhere in the session; eager again afterwards."""
    for kernel in (models._FORWARD, models._BACKWARD):
        kernel.cache.clear()
    yield
    models.compile_energy_kernels(False)


def _loss_and_grads(diffusion, x, y):
    loss, _ = diffusion(x, y, generator=torch.Generator().manual_seed(3))
    return loss, param_grads(diffusion, loss)


def test_compile_failure_falls_back_to_eager(monkeypatch, fresh_kernels):
    """A compiled kernel that cannot run (no C++ compiler, say) warns and the step runs eagerly, unchanged."""

    def broken_compile(fn, **options):
        def run(*args):
            raise RuntimeError("no working C++ compiler")

        return run

    diffusion = make_diffusion("adversarial")
    x, y = problems()
    loss, grads = _loss_and_grads(diffusion, x, y)
    monkeypatch.setattr(torch, "compile", broken_compile)
    assert models.compile_energy_kernels() is True
    with pytest.warns(UserWarning, match="running it eagerly"):
        loss_fallback, grads_fallback = _loss_and_grads(diffusion, x, y)
    assert models._FORWARD.compiled is None and models._BACKWARD.compiled is None
    assert torch.equal(loss, loss_fallback)
    assert all(torch.equal(grads[n], grads_fallback[n]) for n in grads)


def test_compile_unavailable_is_refused_cleanly(monkeypatch, fresh_kernels):
    def no_compile(fn, **options):
        raise RuntimeError("torch.compile is not supported on this Python")

    monkeypatch.setattr(torch, "compile", no_compile)
    with pytest.warns(UserWarning, match="run eagerly"):
        assert models.compile_energy_kernels() is False
    assert models._FORWARD.compiled is None and models._BACKWARD.compiled is None


@pytest.mark.skipif(not os.environ.get("IRED_TEST_COMPILE"), reason="compiles for ~15 s; set IRED_TEST_COMPILE=1")
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_compiled_kernels_match_eager(strategy, fresh_kernels):
    diffusion = make_diffusion(strategy)
    x, y = problems()
    noise = torch.randn(BATCH, RANK * RANK, generator=torch.Generator().manual_seed(6))
    loss, grads = _loss_and_grads(diffusion, x, y)
    answer = diffusion.sample(x, noise=noise)
    assert models.compile_energy_kernels() is True
    loss_compiled, grads_compiled = _loss_and_grads(diffusion, x, y)
    answer_compiled = diffusion.sample(x, noise=noise)
    torch.testing.assert_close(loss_compiled, loss, **TOL)
    for name in grads:
        torch.testing.assert_close(grads_compiled[name], grads[name], **TOL)
    torch.testing.assert_close(answer_compiled, answer, **TOL)
