"""Energy models: the spec's energy MLP and the wrapper whose output is the denoiser grad_y E.

The MLP exposes two steps so the diffusion can reuse work across inner optimisation steps:
`condition(x, t)` computes everything that depends only on the problem x and the time t
(the condition's share of fc1 and the FiLM scales/shifts), and `energy_and_grad(cond, y)` runs
the y-dependent part. The input gradient is derived by hand (checked against autograd in the tests),
so the score loss needs only first-order autograd and mining/sampling build no graph at all.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

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

    def repeat(self, times: int) -> "EnergyCondition":
        return EnergyCondition(*(getattr(self, f.name).repeat(times, 1) for f in fields(self)))

    def select(self, index: slice) -> "EnergyCondition":
        return EnergyCondition(*(getattr(self, f.name)[index] for f in fields(self)))


def _swish_and_slope(z: Tensor) -> tuple[Tensor, Tensor]:
    """swish(z) = z * sigmoid(z) and its derivative sigmoid(z) * (1 + z * (1 - sigmoid(z)))."""
    s = torch.sigmoid(z)
    h = z * s
    return h, s + h * (1 - s)


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
        gain2, shift2 = self.t_map_fc2(emb)[t].chunk(2, dim=-1)
        gain3, shift3 = self.t_map_fc3(emb)[t].chunk(2, dim=-1)
        fc1_x = F.linear(x, self.fc1.weight[:, : self.inp_dim], self.fc1.bias)
        return EnergyCondition(fc1_x, 1 + gain2, shift2, 1 + gain3, shift3)

    def energy_and_grad(
        self, cond: EnergyCondition, y: Tensor, need_grad: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """Energy [B, 1] and, if asked, grad_y E [B, out_dim], by an explicit backward pass."""
        w1_y = self.fc1.weight[:, self.inp_dim :]
        z1 = cond.fc1_x + F.linear(y, w1_y)
        h1, slope1 = _swish_and_slope(z1)
        z2 = self.fc2(h1) * cond.scale2 + cond.shift2
        h2, slope2 = _swish_and_slope(z2)
        z3 = self.fc3(h2) * cond.scale3 + cond.shift3
        h3, slope3 = _swish_and_slope(z3)
        out = self.fc4(h3)
        energy = out.pow(2).sum(dim=-1, keepdim=True)
        if not need_grad:
            return energy, None
        d_z3 = (2 * out) @ self.fc4.weight * slope3
        d_z2 = (d_z3 * cond.scale3) @ self.fc3.weight * slope2
        d_z1 = (d_z2 * cond.scale2) @ self.fc2.weight * slope1
        return energy, d_z1 @ w1_y

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
