"""Plug-ins: a new energy model and a new task, each one class plus a register line, train a tiny study;
the MLP's explicit sweep equals autograd's gradient; given answer entries stay fixed everywhere."""
import json
import math

import pytest
import torch
from torch import nn

from diffusion_lib.harness.config import ConfigError, build_config
from diffusion_lib.diffusion import GaussianDiffusion1D
from diffusion_lib.mining import resolve_mining_config
from diffusion_lib.models import EBM, EnergyModel, build_model, register_model
from diffusion_lib.registry import Option
from diffusion_lib.tasks.base import Batch, HeldOutSet, Metric, Task, make_task, register_task

from diffusion_lib.study import cli as comparison


# -- the plug-ins under test: each is one class and a register line -----------------------------------------
@register_model("two_layer_test", options={"width": Option(int, 16, lambda v: v >= 1, "an int >= 1")})
class TwoLayerEnergy(EnergyModel):
    """E = (w2 . tanh(W1 [x, y, t / T] + b1) + b2)^2: only `energy` is defined; grad_y E is autograd's."""

    def __init__(self, task, runs=1, width=16):
        super().__init__(task, runs)
        self.hidden = nn.Linear(self.inp_dim + self.out_dim + 1, width)
        self.out = nn.Linear(width, 1)

    def energy(self, cond, y):
        t = cond.t.unsqueeze(-1).to(y.dtype) / 10
        return self.out(torch.tanh(self.hidden(torch.cat([cond.x, y, t], dim=-1)))).pow(2)


@register_task
class SignTask(Task):
    """y = sign(x), a random ~30 % of the answer entries given; accuracy (higher is better) of the signs."""

    name = "sign_test"
    options = {"dim": Option(int, 4, lambda v: 1 <= v <= 64, "an int in [1, 64]")}
    metrics = (Metric("accuracy", True, "sign accuracy"),)
    answer_bound = 1.0
    defaults = {"diffusion.inference_steps": 3}

    @property
    def inp_dim(self):
        return self.dim

    @property
    def out_dim(self):
        return self.dim

    def sample(self, batch, generator):
        x = torch.randn(batch, self.dim, generator=generator, device=generator.device)
        mask = torch.rand(batch, self.dim, generator=generator, device=generator.device) < 0.3
        return Batch(x, torch.sign(x), mask)

    def held_out(self, num_samples):
        generator = torch.Generator().manual_seed(11)
        x, y, mask = self.sample(num_samples, generator)
        return {"id": HeldOutSet(x, y, torch.randn(y.shape, generator=generator), mask)}

    def score(self, answer, data):
        return {"accuracy": (torch.sign(answer) == data.y).double().mean(dim=-1)}


# -- the new energy model ------------------------------------------------------------------------------
def test_the_autograd_gradient_of_a_model_with_only_an_energy_matches_its_closed_form():
    torch.manual_seed(0)
    task = make_task({"dataset": "inverse", "rank": 2})
    model = build_model({"name": "two_layer_test", "width": 8}, task).double()
    x, y = torch.randn(1, 5, 4, dtype=torch.float64), torch.randn(1, 5, 4, dtype=torch.float64)
    t = torch.randint(0, 10, (1, 5))
    with torch.no_grad():  # as mining and sampling call it
        energy, grad = model.energy_and_grad(model.condition(x, t, 10), y)
    ebm = model.ebm
    z = torch.cat([x, y, t.unsqueeze(-1).double() / 10], dim=-1)
    h = torch.tanh(z @ ebm.hidden.weight.T + ebm.hidden.bias)
    o = h @ ebm.out.weight.T + ebm.out.bias
    # dE/dy = 2 o * W1_y^T (w2 * (1 - h^2))
    closed = 2 * o * ((ebm.out.weight * (1 - h.pow(2))) @ ebm.hidden.weight[:, 4:8])
    torch.testing.assert_close(energy, o.pow(2))
    torch.testing.assert_close(grad, closed)
    assert not grad.requires_grad  # no graph kept outside training


def test_in_training_the_score_loss_differentiates_through_the_autograd_gradient():
    """create_graph: d/d(theta) of a loss on grad_y E matches a central finite difference."""
    torch.manual_seed(1)
    model = build_model({"name": "two_layer_test", "width": 6}, make_task({"dataset": "inverse", "rank": 2})).double()
    x, y = torch.randn(1, 7, 4, dtype=torch.float64), torch.randn(1, 7, 4, dtype=torch.float64)
    t = torch.randint(0, 10, (1, 7))

    def loss():
        return model.energy_and_grad(model.condition(x, t, 10), y)[1].pow(2).sum()

    loss().backward()
    weight = model.ebm.hidden.parametrizations.weight.original  # [1, out, in]: a pack of one run
    analytic, eps = weight.grad[0, 2, 1].item(), 1e-6
    with torch.no_grad():
        weight[0, 2, 1] += eps
        up = loss().item()
        weight[0, 2, 1] -= 2 * eps
        down = loss().item()
    assert analytic != 0 and analytic == pytest.approx((up - down) / (2 * eps), rel=1e-5)


def test_a_model_that_does_not_pack_refuses_a_pack_in_one_line():
    task = make_task({"dataset": "inverse", "rank": 2})
    with pytest.raises(ValueError, match="model 'two_layer_test' trains one run at a time") as refusal:
        build_model({"name": "two_layer_test"}, task, runs=2)
    assert "\n" not in str(refusal.value)
    assert build_model({"name": "mlp", "hidden_dim": 8}, task, runs=2).runs == 2


# -- the MLP: explicit sweep against the base class's autograd --------------------------------------------
def _mlp_pair(runs=2):
    task = make_task({"dataset": "inverse", "rank": 2})
    sweep = EBM(task, runs=runs, hidden_dim=24).double()
    auto = EBM(task, runs=runs, hidden_dim=24, grad="autograd").double()
    auto.load_state_dict(sweep.state_dict())
    return sweep, auto


@pytest.mark.parametrize("stacked", [False, True])
def test_the_mlp_sweep_equals_autograd_float64(stacked):
    sweep, auto = _mlp_pair()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 4, generator=g, dtype=torch.float64)
    y = torch.randn(2, 3, 6, 4, generator=g, dtype=torch.float64) if stacked else torch.randn(2, 6, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, 10, (2, 6), generator=g)
    with torch.no_grad():
        e1, g1 = sweep.energy_and_grad(sweep.condition(x, t, 10), y)
        e2, g2 = auto.energy_and_grad(auto.condition(x, t, 10), y)
    torch.testing.assert_close(e1, e2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
    assert g1.abs().max() > 1e-3


def test_the_mlp_sweep_and_autograd_give_the_same_parameter_gradients_in_training():
    sweep, auto = _mlp_pair()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(2, 6, 4, generator=g, dtype=torch.float64), torch.randn(2, 6, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, 10, (2, 6), generator=g)
    for model in (sweep, auto):
        model.energy_and_grad(model.condition(x, t, 10), y)[1].pow(2).sum().backward()
    for (name, p), q in zip(sweep.named_parameters(), auto.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=name)


# -- given entries ------------------------------------------------------------------------------------------
class Recorder:
    """Wraps a model's energy_and_grad: every y it is asked about, to check the given entries in it."""

    def __init__(self, model):
        self.inner, self.seen = model.energy_and_grad, []
        model.energy_and_grad = self

    def __call__(self, cond, y, need_grad=True):
        self.seen.append(y.detach().clone())
        return self.inner(cond, y, need_grad)


def _masked_setup(strategy):
    task = make_task({"dataset": "sign_test", "dim": 5})
    model = build_model({"name": "mlp", "hidden_dim": 16}, task).double()
    diffusion = GaussianDiffusion1D(model, mining_config=resolve_mining_config({"strategy": strategy, "opt_steps": 3}),
                                    data_bound=1.0).double()
    x, y, mask = task.sample(12, torch.Generator().manual_seed(4))
    return diffusion, x.double()[None], y.double()[None], mask[None]


def _given_entries_held(y, mask, values, levels):
    """Whether y's given entries equal sqrt(abar_t) * value exactly for the sample's t (one of `levels` [P, B])."""
    scale = levels.unsqueeze(-1)
    if y.dim() == 4:
        scale = scale.unsqueeze(1)
    n = y.shape[-2]  # a strategy may mine the first n of the batch only
    expected = (scale[..., :n, :] * values[..., :n, :]).expand_as(y)
    return torch.equal(y[mask[..., :n, :].expand_as(y)], expected[mask[..., :n, :].expand_as(y)])


@pytest.mark.parametrize("strategy", ["none", "random", "adversarial", "mixed"])
def test_given_entries_stay_fixed_through_noising_and_mining(strategy):
    diffusion, x, y, mask = _masked_setup(strategy)
    recorder = Recorder(diffusion.model)
    draws = diffusion.draw(12, [torch.Generator().manual_seed(5)], "cpu")
    draws.noise, draws.noise_pos = draws.noise.double(), None if draws.noise_pos is None else draws.noise_pos.double()
    diffusion(x, y, draws=draws, mask=mask)
    levels = diffusion.sqrt_alphas_cumprod.double()[draws.t]
    assert len(recorder.seen) >= {"none": 1, "random": 2}.get(strategy, 4)  # adversarial: + start and 3 steps
    assert all(_given_entries_held(seen, mask, y, levels) for seen in recorder.seen)
    # without the mask, the same entries are noised (so the check above can fail)
    recorder.seen.clear()
    diffusion(x, y, draws=draws)
    assert not _given_entries_held(recorder.seen[0], mask, y, levels)


def test_given_entries_stay_fixed_through_sampling():
    diffusion, x, y, mask = _masked_setup("none")
    recorder = Recorder(diffusion.model)
    noise = torch.randn(y.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    answer = diffusion.sample(x, noise=noise, inner_steps=2, given=(mask, y))
    assert torch.equal(answer[mask], y[mask])  # exactly, not up to rounding
    per_level = 1 + 3  # each level: the denoising step, then the inner steps' starting point and 2 proposals
    assert len(recorder.seen) == diffusion.num_timesteps * per_level
    for i, seen in enumerate(recorder.seen):
        level = diffusion.num_timesteps - 1 - i // per_level
        scale = diffusion.sqrt_alphas_cumprod.double()[level].expand(1, 12)
        assert _given_entries_held(seen, mask, y, scale), i
    free = diffusion.sample(x, noise=noise, inner_steps=2)
    assert not torch.equal(free[mask], y[mask])


# -- config: the tasks' and models' keys ----------------------------------------------------------------
def test_task_and_model_keys_are_resolved_by_their_registries():
    config = build_config({"task.dataset": "sign_test"})
    assert config.task == {"dataset": "sign_test", "dim": 4} and config.model["name"] == "mlp"
    assert config.diffusion.inference_steps == 3  # the task's default ...
    assert build_config({"task.dataset": "sign_test", "diffusion.inference_steps": 7}).diffusion.inference_steps == 7
    assert build_config({}).diffusion.inference_steps == 5  # ... and only that task's
    inverse = build_config({"task.conditioning": 0.25}).task
    assert inverse == {"dataset": "inverse", "rank": 20, "ood": False, "conditioning": 0.25, "ood_conditioning": 0.1}


@pytest.mark.parametrize("layer, message", [
    ({"task.rnak": 3}, "task has unknown key 'rnak' for dataset 'inverse' (did you mean 'rank'?); allowed: rank, ood,"),
    ({"task.dataset": "sign_test", "task.rank": 3}, "task has unknown key 'rank' for dataset 'sign_test'; allowed: dim"),
    ({"model.hiden_dim": 3}, "model has unknown key 'hiden_dim' for model 'mlp' (did you mean 'hidden_dim'?)"),
    ({"model.name": "mpl"}, "model['name'] = 'mpl' is unknown (did you mean 'mlp'?)"),
    ({"task.conditioning": -1}, "task['conditioning'] = -1.0 is invalid: must be a float > 0"),
    ({"model.dtype": "float16"}, "model['dtype'] = 'float16' is invalid: must be one of float32, float64, bfloat16"),
])
def test_bad_task_and_model_keys_are_one_line_errors(layer, message):
    with pytest.raises(ConfigError) as refusal:
        build_config(layer)
    assert message in str(refusal.value) and "\n" not in str(refusal.value)


def test_inverse_conditioning_keys_set_lambda():
    task = make_task({"dataset": "inverse", "rank": 3, "conditioning": 2.0, "ood_conditioning": 1.5})
    sets = task.held_out(8)
    for name, lam in (("id", 2.0), ("ood", 1.5)):
        a = sets[name].x.view(-1, 3, 3)
        assert torch.linalg.eigvalsh(a).min() >= lam - 1e-4
        torch.testing.assert_close(a @ sets[name].y.view(-1, 3, 3), torch.eye(3).expand_as(a), atol=1e-4, rtol=0)


# -- tiny studies with each plug-in ---------------------------------------------------------------------------
STUDY = """
name: {name}
seeds: [0, 1]
strategies:
  none: {{strategy: none}}
  adversarial: {{strategy: adversarial, opt_steps: 2}}
task: {task}
model: {model}
train: {{steps: 8, batch_size: 16, log_every: 4, save_every: 8}}
eval: {{every: 4, num_samples: 16, batch_size: 16}}
device: cpu
"""


def _study(tmp_path, name, task, model, *extra):
    path = tmp_path / f"{name}.yaml"
    path.write_text(STUDY.format(name=name, task=task, model=model))
    out = tmp_path / name
    code = comparison.main(["--config", str(path), "--output", str(out), *map(str, extra)])
    return code, out


def _finals(out):
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/final.json"))}


def test_a_tiny_study_trains_the_new_energy_model(tmp_path, capsys):
    code, out = _study(tmp_path, "model_study", "{dataset: inverse, rank: 2}", "{name: two_layer_test, width: 8}")
    finals = _finals(out)
    assert len(finals) == 4 and all(f["status"] == "finished" for f in finals.values()), capsys.readouterr()
    assert all(math.isfinite(f["mse_id"]) and math.isfinite(f["mse_ood_raw"]) for f in finals.values())
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    code, _ = _study(tmp_path, "packed", "{dataset: inverse, rank: 2}", "{name: two_layer_test}", "--pack", 2)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "model 'two_layer_test' trains one run at a time" in err and len(err.splitlines()) == 1


def test_a_tiny_study_trains_the_new_task(tmp_path, capsys):
    code, out = _study(tmp_path, "task_study", "{dataset: sign_test, dim: 3}", "{hidden_dim: 16}")
    finals = _finals(out)
    assert len(finals) == 4 and all(f["status"] == "finished" for f in finals.values()), capsys.readouterr()
    final = finals["adversarial__seed0"]
    assert final["metrics"] == {"accuracy": "higher"} and final["metric_labels"] == {"accuracy": "sign accuracy"}
    assert final["sets"] == ["id"] and final["yardsticks"] == {"id": {}}
    assert 0 <= final["accuracy_id"] <= 1 and 0 <= final["accuracy_id_raw"] <= 1
    assert not any(k.startswith("mse") for k in final)
    lines = [json.loads(line) for line in (out / "runs" / "adversarial__seed0" / "metrics.jsonl").read_text().splitlines()]
    val = [line for line in lines if line["kind"] == "val"][-1]
    assert {k for k in val if k.startswith("val_")} == {"val_accuracy_id", "val_accuracy_id_raw"}
    assert code == 0, capsys.readouterr().err
