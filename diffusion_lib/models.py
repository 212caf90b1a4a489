"""Energy models: the spec's energy MLP and the wrapper whose output is the denoiser grad_y E.

The MLP exposes two steps so the diffusion can reuse work across inner optimisation steps:
`condition(x, t)` computes everything that depends only on the problem x and the time t
(the condition's share of fc1 and the FiLM scales/shifts), and `energy_and_grad(cond, y)` runs
the y-dependent part. The input gradient is derived by hand (checked against autograd in the tests),
so mining and sampling build no graph at all. In training, a custom autograd Function supplies the
hand-derived adjoint of the energy *and* of its input gradient (the score loss differentiates through
grad_y E); tests/test_equivalence.py checks it by finite differences and against a plain autograd
implementation. `compile_energy_kernels()` opts in to torch.compile for these kernels.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


class SinusoidalPosEmb(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * -(math.log(10000) / (half - 1)))
        angles = rearrange(t.float(), "b -> b 1") * rearrange(freqs, "d -> 1 d")
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


@dataclass
class EnergyCondition:
    """The y-independent part of the energy for a batch: fixed during every inner step."""

    fc1_x: Tensor  # fc1 applied to the condition x, bias included: [B, H]
    scale2: Tensor  # 1 + g2: [B, H]
    shift2: Tensor  # b2
    scale3: Tensor  # 1 + g3
    shift3: Tensor  # b3

    def detach(self) -> "EnergyCondition":
        return EnergyCondition(*(getattr(self, f.name).detach() for f in fields(self)))

    def select(self, index: slice) -> "EnergyCondition":
        return EnergyCondition(*(getattr(self, f.name)[index] for f in fields(self)))


def _cond_tensors(cond: EnergyCondition) -> tuple[Tensor, ...]:
    """The condition's tensors in field order (dataclasses.astuple would deep-copy them)."""
    return tuple(getattr(cond, f.name) for f in fields(cond))


def _swish_slope_times(v: Tensor, z: Tensor) -> Tensor:
    """v * swish'(z), swish'(z) = s (1 + z (1 - s)), s = sigmoid(z): one fused pass (silu's own backward)."""
    return torch.ops.aten.silu_backward(v, z)


def _swish_curvature_times(v: Tensor, z: Tensor, h: Tensor) -> Tensor:
    """v * swish''(z), swish''(z) = s (1 - s) (2 + z (1 - 2 s)) = s (1 - s) (2 + z - 2 h), h = swish(z)."""
    v_sigmoid_slope = torch.ops.aten.sigmoid_backward(v, torch.sigmoid(z))  # v s (1 - s) in one pass
    return torch.add(z, h, alpha=-2).add_(2).mul_(v_sigmoid_slope)


def _linear(a: Tensor, w: Tensor, bias: Tensor | None = None, alpha: float = 1.0) -> Tensor:
    """bias + alpha * a @ w over a's last dim (any leading dims) as one GEMM; alpha costs nothing there."""
    flat = a.reshape(-1, a.shape[-1])
    if bias is None and alpha == 1.0:
        out = torch.mm(flat, w)
    elif bias is None:  # beta = 0: the (zero) input is ignored
        out = torch.addmm(flat.new_zeros(()), flat, w, beta=0, alpha=alpha)
    else:
        out = torch.addmm(bias, flat, w, alpha=alpha)
    return out.view(*a.shape[:-1], w.shape[-1])


def _outer_sum(a: Tensor, b: Tensor, into: Tensor | None = None, alpha: float = 1.0) -> Tensor:
    """into + alpha * sum over samples of a^T b (a weight gradient) as one GEMM."""
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    if into is None:
        return torch.mm(a.t(), b) if alpha == 1.0 else torch.addmm(a.new_zeros(()), a.t(), b, beta=0, alpha=alpha)
    return torch.addmm(into, a.t(), b, alpha=alpha)


def _rows(v: Tensor) -> Tensor:
    return v.reshape(-1, v.shape[-1]).sum(0)


Weights = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]  # W1y, W2, b2, W3, b3, W4, b4


class _Energy:
    """The y-dependent part of E, its explicit input gradient, and the hand-derived adjoint of both.

    Notation (k = 1, 2, 3 hidden layers; W are nn.Linear weights [out, in]; c = 1 + g and b are FiLM):
      energy   z1 = fc1_x + y W1y^T,  u_k = h_{k-1} W_k^T + bias_k,  z_k = u_k * c_k + b_k (k = 2, 3),
               h_k = swish(z_k),  d_k = swish'(z_k),  o = h3 W4^T + b4,  E = sum_j o_j^2
      grad_y E a3 = 2 o W4,  g_k = a_k * d_k,  e_k = g_k * c_k,  a_{k-1} = e_k W_k,  G = g1 W1y
    In training the score loss is a function of G, so its parameter gradients need the derivative of
    the gradient sweep as well (second order). `backward` runs the adjoint of both sweeps by hand rather
    than letting autograd differentiate the gradient sweep op by op: the same GEMMs, but about half the
    elementwise passes (swish' and swish'' products are fused aten passes), and only the tensors the
    formulas read are kept for it.
    """

    @staticmethod
    def forward(
        cond: "EnergyCondition", y: Tensor, weights: Weights, need_grad: bool, save: bool
    ) -> tuple[Tensor, Tensor | None, dict[str, Tensor] | None]:
        """E [..., 1], G = grad_y E [..., D] if need_grad, and (if save) what `backward` reads."""
        w1_y, w2, b2, w3, b3, w4, b4 = weights
        z1 = _linear(y, w1_y.t()).add_(cond.fc1_x)
        h1 = F.silu(z1)
        u2 = _linear(h1, w2.t(), b2)
        z2 = torch.addcmul(cond.shift2, u2, cond.scale2)
        h2 = F.silu(z2)
        u3 = _linear(h2, w3.t(), b3)
        z3 = torch.addcmul(cond.shift3, u3, cond.scale3)
        h3 = F.silu(z3)
        out = _linear(h3, w4.t(), b4)
        energy = out.pow(2).sum(dim=-1, keepdim=True)
        trace = dict(y=y, z1=z1, z2=z2, z3=z3, h1=h1, h2=h2, h3=h3, u2=u2, u3=u3, out=out) if save else None
        if not need_grad:
            return energy, None, trace
        a3 = _linear(out, w4, alpha=2.0)
        g3 = _swish_slope_times(a3, z3)
        a2 = _linear(g3 * cond.scale3, w3)
        g2 = _swish_slope_times(a2, z2)
        a1 = _linear(g2 * cond.scale2, w2)
        g1 = _swish_slope_times(a1, z1)
        grad = _linear(g1, w1_y)
        if save:  # the adjoint reads a_k only through m_k = a_k swish''(z_k): keep that, not a_k
            m1, m2, m3 = (_swish_curvature_times(a, z, h) for a, z, h in ((a1, z1, h1), (a2, z2, h2), (a3, z3, h3)))
            trace.update(g1=g1, g2=g2, g3=g3, m1=m1, m2=m2, m3=m3)
        return energy, grad, trace

    @staticmethod
    def backward(
        cond: "EnergyCondition",
        weights: Weights,
        tr: dict[str, Tensor],
        g_energy: Tensor | None,
        g_grad: Tensor | None,
        need_y: bool,
    ) -> tuple[Tensor | None, list[Tensor], list[Tensor]]:
        """Gradients of a loss L(E, G) from dL/dE and dL/dG (either may be None).

        Returns dL/dy (if need_y), dL/d(condition fields) and dL/d(weights), in input order.
        """
        w1_y, w2, b2, w3, b3, w4, b4 = weights
        w, c = {2: w2, 3: w3}, {2: cond.scale2, 3: cond.scale3}  # hidden layers 2, 3: weight and FiLM scale
        dw: dict[int, Tensor] = {}  # weight gradients by layer (1: fc1's y columns, 4: fc4)
        g_bar: dict[int, Tensor] = {}  # dL/dg_k (g_k = a_k d_k, so dL/dd_k = dL/dg_k * a_k)
        c_bar: dict[int, Tensor] = {}  # dL/dc_k
        out_bar = None
        if g_grad is not None:  # adjoint of the gradient sweep, from G = g1 W1y back to a3 = 2 o W4
            dw[1] = _outer_sum(tr["g1"], g_grad)
            g_bar[1] = _linear(g_grad, w1_y.t())
            for k in (1, 2):  # g_k = a_k d_k,  a_k = e_{k+1} W_{k+1},  e_{k+1} = g_{k+1} c_{k+1}
                a_bar = _swish_slope_times(g_bar[k], tr[f"z{k}"])
                g_next = tr[f"g{k + 1}"]
                dw[k + 1] = _outer_sum(g_next * c[k + 1], a_bar)
                e_bar = _linear(a_bar, w[k + 1].t())
                g_bar[k + 1], c_bar[k + 1] = e_bar * c[k + 1], e_bar.mul_(g_next)
            a_bar = _swish_slope_times(g_bar[3], tr["z3"])
            dw[4] = _outer_sum(tr["out"], a_bar, alpha=2.0)  # a3 = 2 o W4
            out_bar = _linear(a_bar, w4.t(), alpha=2.0)
        if g_energy is not None:  # E = sum_j o_j^2
            energy_term = tr["out"] * (2 * g_energy)
            out_bar = energy_term if out_bar is None else out_bar.add_(energy_term)
        # adjoint of the energy sweep, from o back to z1
        dw[4] = _outer_sum(out_bar, tr["h3"], into=dw.get(4))
        bias_bar = {4: _rows(out_bar)}
        h_bar = _linear(out_bar, w4)
        z_bar: dict[int, Tensor] = {}
        for k in (3, 2):  # z_k = u_k c_k + b_k,  u_k = h_{k-1} W_k^T + bias_k
            z_bar[k] = _z_bar(h_bar, tr, k, g_bar.get(k))
            u_bar = z_bar[k] * c[k]
            c_bar[k] = c_bar[k].addcmul_(z_bar[k], tr[f"u{k}"]) if k in c_bar else z_bar[k] * tr[f"u{k}"]
            dw[k] = _outer_sum(u_bar, tr[f"h{k - 1}"], into=dw.get(k))
            bias_bar[k] = _rows(u_bar)
            h_bar = _linear(u_bar, w[k])
        z_bar[1] = _z_bar(h_bar, tr, 1, g_bar.get(1))
        dw[1] = _outer_sum(z_bar[1], tr["y"], into=dw.get(1))
        y_bar = _linear(z_bar[1], w1_y) if need_y else None
        per_sample = cond.scale2.shape  # a stacked y ([k, B, D]) broadcast the condition over k: sum it back
        cond_bars = [v.sum_to_size(per_sample) for v in (z_bar[1], c_bar[2], z_bar[2], c_bar[3], z_bar[3])]
        return y_bar, cond_bars, [dw[1], dw[2], bias_bar[2], dw[3], bias_bar[3], dw[4], bias_bar[4]]


def _z_bar(h_bar: Tensor, tr: dict[str, Tensor], k: int, g_bar: Tensor | None) -> Tensor:
    """dL/dz_k = dL/dh_k swish'(z_k) + dL/dd_k swish''(z_k), with d_k = swish'(z_k), dL/dd_k = dL/dg_k a_k."""
    z_bar = _swish_slope_times(h_bar, tr[f"z{k}"])
    return z_bar if g_bar is None else z_bar.addcmul_(g_bar, tr[f"m{k}"])


class _Kernel:
    """One of the energy kernels, run eagerly or, after `compile_energy_kernels()`, through torch.compile.

    The compiled kernel is the same function; if compiling or running it fails (no C++ compiler, an
    unsupported device or Python), the kernel warns once and runs eagerly from then on. The kernels
    only write to tensors they allocate, so re-running a failed call eagerly is safe.
    """

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self.compiled: Callable[..., Any] | None = None
        self.cache: dict[str, Callable[..., Any]] = {}  # compiled wrappers by options: re-enabling is free

    def __call__(self, *args: Any) -> Any:
        if self.compiled is not None:
            try:
                # kernels never need autograd on their inputs; detached, dynamo sees plain leaf tensors
                return self.compiled(*_detached(args))
            except Exception as error:  # noqa: BLE001 - any compile failure: fall back, keep training
                self.compiled = None
                self.cache.clear()
                warnings.warn(f"torch.compile of {self.fn.__qualname__} failed, running it eagerly: {error!r}")
        return self.fn(*args)


def _detached(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, EnergyCondition):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


_FORWARD, _BACKWARD = _Kernel(_Energy.forward), _Kernel(_Energy.backward)


def compile_energy_kernels(enabled: bool = True, **compile_options: Any) -> bool:
    """Opt in (or out) of torch.compile for the energy kernels, process-wide; True if now compiled.

    Compiling fuses the kernels' elementwise passes, at the price of a one-off compile of some seconds
    per kernel variant and input shape. Measured gains are small and device-dependent, hence off by
    default: on a 2-core CPU 5-11 % per `none` step, 7 % per `adversarial` step, 2-4 % for sampling
    (benchmarks/results.md); on one H200 in float32, ~1.3x for the adversarial loss + backward but
    *slower* for `none` (that step is bound by kernel launches, which compiling does not remove).
    """
    for kernel in (_FORWARD, _BACKWARD):
        kernel.compiled = None
        if not enabled:
            continue
        key = repr(sorted(compile_options.items()))
        try:
            kernel.compiled = kernel.cache.get(key) or kernel.cache.setdefault(
                key, torch.compile(kernel.fn, **compile_options)
            )
        except Exception as error:  # noqa: BLE001 - e.g. a Python version torch.compile does not support
            warnings.warn(f"torch.compile is unavailable, the energy kernels run eagerly: {error!r}")
            _FORWARD.compiled = _BACKWARD.compiled = None
            return False
    return enabled


class _EnergyFunction(torch.autograd.Function):
    """Autograd node for `_Energy`: outputs E (and G = grad_y E if need_grad); hand-derived backward."""

    @staticmethod
    def forward(ctx, need_grad: bool, y: Tensor, *tensors: Tensor):
        cond, weights = EnergyCondition(*tensors[:5]), tensors[5:]
        energy, grad, trace = _FORWARD(cond, y, weights, need_grad, True)
        ctx.set_materialize_grads(False)
        ctx.num_inputs, ctx.trace_names = len(tensors), tuple(trace)
        ctx.save_for_backward(*tensors, *trace.values())
        return (energy, grad) if need_grad else energy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_energy: Tensor | None, g_grad: Tensor | None = None):
        saved = ctx.saved_tensors
        inputs, trace = saved[: ctx.num_inputs], dict(zip(ctx.trace_names, saved[ctx.num_inputs :]))
        if g_energy is None and g_grad is None:
            return (None,) * (2 + len(inputs))
        y_bar, cond_bars, weight_bars = _BACKWARD(
            EnergyCondition(*inputs[:5]), inputs[5:], trace, g_energy, g_grad, ctx.needs_input_grad[1]
        )
        return (None, y_bar, *cond_bars, *weight_bars)


class EBM(nn.Module):
    """E(x, y, t) = sum_j fc4(h3)_j^2 with FiLM time conditioning (names as in reference checkpoints)."""

    def __init__(self, inp_dim: int, out_dim: int, hidden_dim: int = 512, time_dim: int = 128):
        super().__init__()
        self.inp_dim, self.out_dim = inp_dim, out_dim
        self.time_mlp = nn.Sequential(
            SinusoidalPosEmb(time_dim),
            nn.Linear(time_dim, time_dim),
            nn.GELU(),
            nn.Linear(time_dim, time_dim),
        )
        self.fc1 = nn.Linear(inp_dim + out_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, hidden_dim)
        self.fc3 = nn.Linear(hidden_dim, hidden_dim)
        self.fc4 = nn.Linear(hidden_dim, out_dim)
        self.t_map_fc2 = nn.Linear(time_dim, 2 * hidden_dim)
        self.t_map_fc3 = nn.Linear(time_dim, 2 * hidden_dim)

    def condition(self, x: Tensor, t: Tensor, num_timesteps: int) -> EnergyCondition:
        # The time path depends on t alone: run it once per distinct timestep, then gather per sample.
        steps = torch.arange(num_timesteps, device=x.device)
        emb = self.time_mlp(steps)
        gain2, shift2 = self.t_map_fc2(emb).chunk(2, dim=-1)
        gain3, shift3 = self.t_map_fc3(emb).chunk(2, dim=-1)
        fc1_x = F.linear(x, self.fc1.weight[:, : self.inp_dim], self.fc1.bias)
        # FiLM scale 1 + g is formed per timestep (T rows), then one gather to B rows. index_select, not
        # t-indexing: its backward (index_add) is several times faster on CPU than indexing's index_put.
        film = torch.cat([1 + gain2, shift2, 1 + gain3, shift3], dim=-1).index_select(0, t)
        return EnergyCondition(fc1_x, *film.chunk(4, dim=-1))

    def energy_and_grad(
        self, cond: EnergyCondition, y: Tensor, need_grad: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """Energy [..., 1] and, if asked, grad_y E [..., out_dim], by an explicit backward pass.

        y may carry leading dims ([k, B, out_dim]) over which the per-sample condition broadcasts.
        When autograd needs it (training), a custom Function supplies the hand-derived gradients of
        E and grad_y E for every parameter; otherwise (mining, sampling) the same forward runs bare.
        """
        weights = (
            self.fc1.weight[:, self.inp_dim :],
            self.fc2.weight, self.fc2.bias, self.fc3.weight, self.fc3.bias, self.fc4.weight, self.fc4.bias,
        )
        tensors = (y, *_cond_tensors(cond), *weights)
        if torch.is_grad_enabled() and any(v.requires_grad for v in tensors):
            result = _EnergyFunction.apply(need_grad, *tensors)
            return result if need_grad else (result, None)
        energy, grad, _ = _FORWARD(cond, y, weights, need_grad, False)
        return energy, grad

    def forward(self, x: Tensor, y: Tensor, t: Tensor, num_timesteps: int | None = None) -> Tensor:
        num_timesteps = num_timesteps or int(t.max()) + 1
        energy, _ = self.energy_and_grad(self.condition(x, t, num_timesteps), y, need_grad=False)
        return energy


class EnergyDenoiser(nn.Module):
    """Wraps an energy model; its output is the denoiser eps_hat(x, y_t, t) = grad_y E(x, y_t, t).

    Holds the energy model as `ebm`, so reference checkpoints' `ebm.*` names load unchanged.
    """

    def __init__(self, ebm: nn.Module):
        super().__init__()
        self.ebm = ebm

    @property
    def inp_dim(self) -> int:
        return self.ebm.inp_dim

    @property
    def out_dim(self) -> int:
        return self.ebm.out_dim

    def condition(self, x: Tensor, t: Tensor, num_timesteps: int) -> EnergyCondition:
        return self.ebm.condition(x, t, num_timesteps)

    def energy_and_grad(
        self, cond: EnergyCondition, y: Tensor, need_grad: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        return self.ebm.energy_and_grad(cond, y, need_grad)

    def energy(self, x: Tensor, y: Tensor, t: Tensor, num_timesteps: int | None = None) -> Tensor:
        return self.ebm(x, y, t, num_timesteps)

    def forward(self, x: Tensor, y: Tensor, t: Tensor, num_timesteps: int | None = None) -> Tensor:
        num_timesteps = num_timesteps or int(t.max()) + 1
        _, grad = self.energy_and_grad(self.condition(x, t, num_timesteps), y)
        return grad
