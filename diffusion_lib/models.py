"""Energy models as plug-ins: a registry (`model.name`), the EnergyModel base class, and the spec's MLP.

A model defines its energy E(x, y, t) (`energy`); grad_y E, the denoiser, comes from autograd by default,
with the graph kept in training so the score loss can be differentiated through it. So a new architecture
is one class and a `@register_model(...)` line.

The MLP ("mlp", the default) holds P independent runs at once (`packs = True`): every weight carries a
leading run dimension P, a matmul of all P runs is one batched GEMM, and a single run is P = 1. Inputs
are [P, B, dim]; nothing mixes runs, so each run computes exactly what it would alone. It splits the
energy in two so the diffusion reuses work across inner optimisation steps: `condition(x, t)` computes
what depends only on the problem x and the time t, and its `energy_and_grad(cond, y)` overrides the
autograd default with an explicit backward sweep written in ordinary differentiable ops (model option
`grad: autograd` runs the base class's autograd path instead, for comparison). `run_state_dict(i)` /
`load_run_state_dict(state, i)` read and write one run's weights with the reference names and shapes
(`ebm.fc1.weight` [512, in], ...), which is also how checkpoints store them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar, Mapping

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.utils import parametrize

from diffusion_lib.registry import Option, Registry, one_of


class PackedLinear(nn.Module):
    """P independent nn.Linear layers applied to [P, ..., in]: one batched GEMM.

    Initialised as nn.Linear does, run by run, each from its own generator (so a run's weights do not
    depend on the other runs in its pack).
    """

    def __init__(self, in_features: int, out_features: int, runs: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(runs, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(runs, out_features))

    def reset_run(self, run: int, generator: torch.Generator) -> None:
        # nn.Linear's default: kaiming_uniform(a = sqrt(5)) for the weight, i.e. U(-1/sqrt(in), 1/sqrt(in)),
        # and the same bound for the bias
        bound = 1 / math.sqrt(self.in_features)
        with torch.no_grad():
            self.weight[run].uniform_(-bound, bound, generator=generator)
            self.bias[run].uniform_(-bound, bound, generator=generator)

    def forward(self, x: Tensor) -> Tensor:
        return packed_linear(x, self.weight, self.bias)


def packed_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, transpose: bool = True) -> Tensor:
    """bias + x @ weight^T per run (weight [P, out, in], x [P, ..., in]); transpose=False: x @ weight."""
    runs = weight.shape[0]
    flat = x.reshape(runs, -1, x.shape[-1])
    w = weight.transpose(1, 2) if transpose else weight
    out = torch.bmm(flat, w) if bias is None else torch.baddbmm(bias.unsqueeze(1), flat, w)
    return out.view(*x.shape[:-1], out.shape[-1])


def swish_slope_times(v: Tensor, z: Tensor) -> Tensor:
    """v * swish'(z), swish'(z) = s (1 + z (1 - s)), s = sigmoid(z).

    Without a graph to record (mining, sampling) it is silu's own backward kernel, one fused pass;
    autograd has no derivative for that kernel, so training spells the formula out.
    """
    if torch.is_grad_enabled() and (v.requires_grad or z.requires_grad):
        s = torch.sigmoid(z)
        return v * s * (1 + z * (1 - s))
    return torch.ops.aten.silu_backward(v, z)


class SinusoidalPosEmb(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * -(math.log(10000) / (half - 1)))
        angles = rearrange(t.float(), "b -> b 1") * rearrange(freqs, "d -> 1 d")
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class Condition:
    """What a model computes from (x, t) alone, fixed during every inner step: a dataclass of tensors
    whose dim 1 (after the run dim) is the batch."""

    def _map(self, fn: Callable[[Tensor], Tensor]) -> Any:
        return type(self)(*(fn(getattr(self, f.name)) for f in fields(self)))

    def detach(self) -> Any:
        return self._map(Tensor.detach)

    def select(self, index: slice) -> Any:
        """A slice of every run's batch (dim 1)."""
        return self._map(lambda v: v[:, index])

    def broadcast_to(self, y: Tensor) -> Any:
        """Views matching y = [P, k, B, D] (k stacked answers per problem) over the k dim."""
        if y.dim() == 3:
            return self
        return self._map(lambda v: v.unsqueeze(1))


@dataclass
class InputCondition(Condition):
    """The default condition: the problem x [P, B, inp] and the timestep t [P, B] as they are."""

    x: Tensor
    t: Tensor

    def broadcast_to(self, y: Tensor) -> InputCondition:
        """x and t expanded to y's leading dims, so an energy sees x [..., inp] beside y [..., D]."""
        lead = y.shape[:-1]
        if y.dim() == 3:
            return self
        return InputCondition(self.x.unsqueeze(1).expand(*lead, -1), self.t.unsqueeze(1).expand(*lead))


@dataclass
class EnergyCondition(Condition):
    """The MLP's y-independent part of the energy for a batch [P, B, H]."""

    fc1_x: Tensor  # fc1 applied to the condition x, bias included
    scale2: Tensor  # 1 + g2
    shift2: Tensor  # b2
    scale3: Tensor  # 1 + g3
    shift3: Tensor  # b3


class EnergyModel(nn.Module):
    """Base class of every energy model. A subclass defines `energy`; it may override `condition` (to
    compute the y-independent work once per batch), `energy_and_grad` (an explicit gradient) and
    `init_run`. Shapes: x [P, B, inp], y [P, B, D] or [P, k, B, D] (k stacked answers share the condition);
    P > 1 only for a model with `packs = True`."""

    packs: ClassVar[bool] = False
    options: ClassVar[dict[str, Option]] = {}

    def __init__(self, task: Any, runs: int = 1, **options: Any):
        super().__init__()
        self.inp_dim, self.out_dim = task.inp_dim, task.out_dim
        self._runs = runs

    @property
    def runs(self) -> int:
        return self._runs

    def condition(self, x: Tensor, t: Tensor, num_timesteps: int) -> Any:
        return InputCondition(x, t)

    def energy(self, cond: Any, y: Tensor) -> Tensor:
        """E [..., 1] for y [..., D] (cond already broadcast to y's leading dims)."""
        raise NotImplementedError

    def energy_and_grad(self, cond: Any, y: Tensor, need_grad: bool = True) -> tuple[Tensor, Tensor | None]:
        """Energy [..., 1] and, if asked, grad_y E by autograd: with the graph kept when grad is enabled
        (training differentiates the score loss through it), detached otherwise (mining, sampling)."""
        cond = cond.broadcast_to(y)
        if not need_grad:
            return self.energy(cond, y), None
        training = torch.is_grad_enabled()
        with torch.enable_grad():
            y_in = y if y.requires_grad else y.detach().requires_grad_(True)
            energy = self.energy(cond, y_in)
            (grad,) = torch.autograd.grad(energy.sum(), y_in, create_graph=training)
        return (energy, grad) if training else (energy.detach(), grad.detach())

    def forward(self, x: Tensor, y: Tensor, t: Tensor, num_timesteps: int | None = None) -> Tensor:
        """E(x, y, t) [..., 1]."""
        num_timesteps = num_timesteps or int(t.max()) + 1
        energy, _ = self.energy_and_grad(self.condition(x, t, num_timesteps), y, need_grad=False)
        return energy

    def init_run(self, run: int, seed: int) -> None:
        """Initialise run `run`'s weights from `seed` alone."""
        generator = torch.Generator(device=next(self.parameters()).device).manual_seed(seed)
        for layer in self.modules():
            if isinstance(layer, nn.Linear):
                _reset_linear(layer, generator)


def _reset_linear(layer: nn.Linear, generator: torch.Generator) -> None:
    # nn.Linear's default init (kaiming_uniform(a = sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)), the bias alike)
    bound = 1 / math.sqrt(layer.in_features)
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=generator)
        if layer.bias is not None:
            layer.bias.uniform_(-bound, bound, generator=generator)


class _RunSlot(nn.Module):
    """Stores a parameter as [1, *shape], the leading run dim every packed parameter has, while the model
    sees [*shape]: the trainer's per-run clipping, EMA, optimiser state and checkpoints then treat a model
    that does not pack as a pack of one, unchanged."""

    def forward(self, packed: Tensor) -> Tensor:
        # without grad a view of a parameter still says requires_grad (with no grad_fn), which hooks such
        # as FlopCounterMode's module tracker refuse; detached, it shares the storage all the same
        return packed[0] if torch.is_grad_enabled() else packed[0].detach()

    def right_inverse(self, value: Tensor) -> Tensor:
        return value.unsqueeze(0)


def _add_run_dim(model: nn.Module) -> None:
    for module in list(model.modules()):
        for name, _ in list(module.named_parameters(recurse=False)):
            parametrize.register_parametrization(module, name, _RunSlot(), unsafe=True)


# -- the registry -----------------------------------------------------------------------------------------
DTYPES = ("float32", "float64", "bfloat16")
# common to every model: the compute dtype (float64 for exactness checks; bfloat16 = mixed precision)
COMMON_OPTIONS: dict[str, Option] = {"dtype": one_of(*DTYPES)}
MODELS: Registry[type[EnergyModel]] = Registry("model", "name", "mlp", "model", COMMON_OPTIONS)


def register_model(name: str, options: dict[str, Option] | None = None) -> Callable[[type[EnergyModel]], type[EnergyModel]]:
    """Class decorator: `@register_model("name", options={...})` makes the class `model.name: <name>`."""

    def decorator(cls: type[EnergyModel]) -> type[EnergyModel]:
        cls.options = options or {}
        return MODELS.register(name, cls)

    return decorator


def check_packs(model_cfg: Mapping[str, Any], runs: int) -> None:
    """Refuse, in one line, a pack of several runs for a model that holds one run at a time."""
    name = MODELS.name_of(model_cfg)
    if runs > 1 and not MODELS[name].packs:
        raise ValueError(f"model '{name}' trains one run at a time: pack {runs} runs is not possible; use --pack 1")


def model_packs(model_cfg: Mapping[str, Any]) -> bool:
    return MODELS[MODELS.name_of(model_cfg)].packs


def build_model(model_cfg: Mapping[str, Any], task: Any, runs: int = 1) -> EnergyDenoiser:
    """The model `model_cfg` names, for `task`, holding `runs` runs (each initialised from its run index)."""
    resolved = MODELS.resolve(model_cfg)
    check_packs(resolved, runs)
    options = {k: v for k, v in resolved.items() if k not in ("name", *COMMON_OPTIONS)}
    model = MODELS[resolved["name"]](task, runs, **options)
    if not model.packs:
        _add_run_dim(model)
    for run in range(runs):
        model.init_run(run, run)
    return EnergyDenoiser(model)


@register_model("mlp", options={
    # at most 16384: the first layer alone has (inputs + outputs) x hidden_dim weights
    "hidden_dim": Option(int, 512, lambda v: 1 <= v <= 16384, "an int in [1, 16384]"),
    # sweep: the explicit backward sweep below; autograd: the base class's default (to compare them)
    "grad": one_of("sweep", "autograd"),
})
class EBM(EnergyModel):
    """E(x, y, t) = sum_j fc4(h3)_j^2 with FiLM time conditioning, for `runs` independent weight sets.

    Parameter names follow the reference checkpoints (time_mlp.1, time_mlp.3, fc1 ... fc4, t_map_fc2,
    t_map_fc3); `init_run(i, seed)` initialises run i from its own seed.
    """

    packs = True

    def __init__(self, task: Any, runs: int = 1, hidden_dim: int = 512, time_dim: int = 128, grad: str = "sweep"):
        super().__init__(task, runs)
        inp_dim, out_dim = self.inp_dim, self.out_dim
        self.grad = grad
        self.time_mlp = nn.Sequential(
            SinusoidalPosEmb(time_dim),
            PackedLinear(time_dim, time_dim, runs),
            nn.GELU(),
            PackedLinear(time_dim, time_dim, runs),
        )
        self.fc1 = PackedLinear(inp_dim + out_dim, hidden_dim, runs)
        self.fc2 = PackedLinear(hidden_dim, hidden_dim, runs)
        self.fc3 = PackedLinear(hidden_dim, hidden_dim, runs)
        self.fc4 = PackedLinear(hidden_dim, out_dim, runs)
        self.t_map_fc2 = PackedLinear(time_dim, 2 * hidden_dim, runs)
        self.t_map_fc3 = PackedLinear(time_dim, 2 * hidden_dim, runs)
        for run in range(runs):
            self.init_run(run, run)

    @property
    def runs(self) -> int:
        return self.fc1.weight.shape[0]  # a pack shrinks when runs fail (Trainer1D._keep)

    def init_run(self, run: int, seed: int) -> None:
        """Initialise run `run`'s weights from `seed` alone (layers in definition order)."""
        generator = torch.Generator(device=self.fc1.weight.device).manual_seed(seed)
        for layer in self.modules():
            if isinstance(layer, PackedLinear):
                layer.reset_run(run, generator)

    def condition(self, x: Tensor, t: Tensor, num_timesteps: int) -> EnergyCondition:
        """x [P, B, inp_dim], t [P, B] -> the condition's tensors [P, B, H]."""
        runs = self.runs
        # The time path depends on t alone: run it once per distinct timestep, then gather per sample.
        emb = self.time_mlp[0](torch.arange(num_timesteps, device=x.device)).to(x.dtype)
        emb = self.time_mlp[1:](emb.expand(runs, -1, -1))
        gain2, shift2 = self.t_map_fc2(emb).chunk(2, dim=-1)
        gain3, shift3 = self.t_map_fc3(emb).chunk(2, dim=-1)
        fc1_x = packed_linear(x, self.fc1.weight[:, :, : self.inp_dim], self.fc1.bias)
        # FiLM scale 1 + g is formed per timestep (T rows a run), then one gather to B rows. index_select,
        # not t-indexing: its backward (index_add) is several times faster on CPU than indexing's index_put.
        film = torch.cat([1 + gain2, shift2, 1 + gain3, shift3], dim=-1)
        rows = t + torch.arange(runs, device=t.device).unsqueeze(-1) * num_timesteps
        film = film.reshape(runs * num_timesteps, -1).index_select(0, rows.reshape(-1))
        return EnergyCondition(fc1_x, *film.view(*t.shape, -1).chunk(4, dim=-1))

    def _forward(self, c: EnergyCondition, y: Tensor) -> tuple[Tensor, ...]:
        """z1, z2, z3 and fc4's output for y (c broadcast to y)."""
        z1 = packed_linear(y, self.fc1.weight[:, :, self.inp_dim :]) + c.fc1_x
        z2 = torch.addcmul(c.shift2, packed_linear(F.silu(z1), self.fc2.weight, self.fc2.bias), c.scale2)
        z3 = torch.addcmul(c.shift3, packed_linear(F.silu(z2), self.fc3.weight, self.fc3.bias), c.scale3)
        return z1, z2, z3, packed_linear(F.silu(z3), self.fc4.weight, self.fc4.bias)

    def energy(self, cond: EnergyCondition, y: Tensor) -> Tensor:
        return self._forward(cond, y)[-1].pow(2).sum(dim=-1, keepdim=True)

    def energy_and_grad(self, cond: EnergyCondition, y: Tensor, need_grad: bool = True) -> tuple[Tensor, Tensor | None]:
        """Energy [..., 1] and, if asked, grad_y E [..., out_dim], for y [P, B, D] or [P, k, B, D].

        The gradient is an explicit backward sweep (a_k: dE/dh_k, g_k: dE/dz_k):
          z1 = fc1_x + y W1y^T, h_k = swish(z_k), z_k = (h_{k-1} W_k^T + b_k) c_k + s_k (k = 2, 3),
          o = h3 W4^T + b4, E = sum_j o_j^2;  a3 = 2 o W4, g_k = a_k swish'(z_k), a_{k-1} = (g_k c_k) W_k,
          grad_y E = g1 W1y.
        """
        if self.grad == "autograd":
            return super().energy_and_grad(cond, y, need_grad)
        c = cond.broadcast_to(y)
        z1, z2, z3, out = self._forward(c, y)
        energy = out.pow(2).sum(dim=-1, keepdim=True)
        if not need_grad:
            return energy, None
        g3 = swish_slope_times(packed_linear(2 * out, self.fc4.weight, transpose=False), z3)
        g2 = swish_slope_times(packed_linear(g3 * c.scale3, self.fc3.weight, transpose=False), z2)
        g1 = swish_slope_times(packed_linear(g2 * c.scale2, self.fc2.weight, transpose=False), z1)
        return energy, packed_linear(g1, self.fc1.weight[:, :, self.inp_dim :], transpose=False)


class EnergyDenoiser(nn.Module):
    """Wraps an energy model; its output is the denoiser eps_hat(x, y_t, t) = grad_y E(x, y_t, t).

    Holds the energy model as `ebm`, so one run's weights carry the reference checkpoints' `ebm.*` names.
    """

    def __init__(self, ebm: EnergyModel):
        super().__init__()
        self.ebm = ebm

    @property
    def inp_dim(self) -> int:
        return self.ebm.inp_dim

    @property
    def out_dim(self) -> int:
        return self.ebm.out_dim

    @property
    def runs(self) -> int:
        return self.ebm.runs

    def condition(self, x: Tensor, t: Tensor, num_timesteps: int) -> Any:
        return self.ebm.condition(x, t, num_timesteps)

    def energy_and_grad(self, cond: Any, y: Tensor, need_grad: bool = True) -> tuple[Tensor, Tensor | None]:
        return self.ebm.energy_and_grad(cond, y, need_grad)

    def energy(self, x: Tensor, y: Tensor, t: Tensor, num_timesteps: int | None = None) -> Tensor:
        return self.ebm(x, y, t, num_timesteps)

    def forward(self, x: Tensor, y: Tensor, t: Tensor, num_timesteps: int | None = None) -> Tensor:
        num_timesteps = num_timesteps or int(t.max()) + 1
        _, grad = self.energy_and_grad(self.condition(x, t, num_timesteps), y)
        return grad
