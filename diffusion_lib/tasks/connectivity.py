"""Graph connectivity: does node i reach node j in a random undirected graph? (IRED's connectivity task.)

Graphs are Erdos-Renyi: each of the n (n - 1) / 2 node pairs is an edge with probability `density`,
drawn in one batched torch call on the generator's device. The condition is the adjacency matrix in
+-1 (no self-loops: the diagonal is -1); the answer is the reachability matrix in +-1 with the diagonal
included (a node reaches itself), as in the published code. Both are flattened row-major, n^2 entries.

Held-out sets are fixed by seed: "id" at the training node count (12 by default) and harder sets of
larger graphs ("ood15", "ood20") at the same edge probability or the same mean degree, which is why the
energy model below has no weight whose shape depends on n. Answers are decoded by their sign.

The task (`task.dataset: connectivity`) and its energy model (`model.name: graph`) are registered at
the end of this module.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from functools import lru_cache

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lib.models import Condition, EnergyModel, SinusoidalPosEmb, register_model
from diffusion_lib.registry import Option, int_in, one_of
from diffusion_lib.tasks.base import Batch, HeldOutSet, Metric, Task, mix_seed, register_task

TRAIN_NODES = 12
HARDER_NODES = (15, 20)
DENSITY = 0.12
FIT_SAMPLES = 4096  # graphs from a seed of their own to pick the majority yardstick's label
HOPS = (1, 2, 3)
_NAME_SEED = zlib.crc32(b"connectivity")


@dataclass
class GraphProblems:
    x: Tensor  # adjacency in +-1 [B, n^2]
    y: Tensor  # reachability in +-1 [B, n^2], diagonal +1
    nodes: int


# -- data ------------------------------------------------------------------------------------------------
def random_adjacency(batch: int, nodes: int, density: float, generator: torch.Generator) -> Tensor:
    """Boolean symmetric adjacency [B, n, n] with an empty diagonal, on the generator's device."""
    draws = torch.rand((batch, nodes, nodes), generator=generator, device=generator.device) < density
    upper = torch.triu(draws, diagonal=1)
    return upper | upper.transpose(-1, -2)


def reachability(adjacency: Tensor) -> Tensor:
    """Boolean transitive-reflexive closure [B, n, n] by repeated squaring of (I or A): log2(n) matmuls."""
    nodes = adjacency.shape[-1]
    eye = torch.eye(nodes, dtype=torch.bool, device=adjacency.device)
    reach = (adjacency | eye).float()
    # after s squarings, reach covers every path of length <= 2^s; n - 1 hops suffice
    for _ in range(max(1, math.ceil(math.log2(max(nodes - 1, 1))))):
        reach = (reach @ reach).clamp(max=1.0)
    return reach > 0


def to_pm1(flags: Tensor) -> Tensor:
    """Booleans [B, n, n] -> floats in +-1, flattened to [B, n^2]."""
    return (flags.float() * 2 - 1).flatten(-2)


def sample_graphs(batch: int, nodes: int, density: float, generator: torch.Generator) -> GraphProblems:
    """A batch of (adjacency, reachability) problems in +-1, on the generator's device."""
    adjacency = random_adjacency(batch, nodes, density, generator)
    return GraphProblems(to_pm1(adjacency), to_pm1(reachability(adjacency)), nodes)


def set_seed(nodes: int, density: float, role: int = 0) -> int:
    """The held-out seed of a (node count, density); role 1 is the yardstick fit's own seed."""
    return mix_seed(_NAME_SEED, nodes, round(density * 1_000_000), role)


@lru_cache(maxsize=16)
def _held_out_one(num_samples: int, nodes: int, density: float) -> GraphProblems:
    generator = torch.Generator().manual_seed(set_seed(nodes, density))
    return sample_graphs(num_samples, nodes, density, generator)


def held_out_graphs(num_samples: int, nodes: int = TRAIN_NODES, harder: tuple[int, ...] = HARDER_NODES,
                    density: float = DENSITY, keep_degree: bool = False) -> dict[str, GraphProblems]:
    """The fixed held-out sets on the CPU: "id" at `nodes`, "ood<n>" for each harder node count.

    The harder sets keep the edge probability (their graphs are denser in degree, and more of their pairs
    are connected) or, with keep_degree, the mean degree: density (nodes - 1) / (n - 1).
    """
    sets = {"id": _held_out_one(num_samples, nodes, density)}
    for n in harder:
        scaled = density * (nodes - 1) / (n - 1) if keep_degree else density
        sets[f"ood{n}"] = _held_out_one(num_samples, n, scaled)
    return sets


# -- negatives -------------------------------------------------------------------------------------------
CORRUPTIONS = ("published", "clean")


def corrupt_reachability(y: Tensor, fraction: float, uniform: Tensor, kind: str = "published") -> Tensor:
    """The 'random' negatives: the true answer y [..., n^2] with entries changed, `uniform` the run's own
    random numbers in [0, 1) of y's shape.

    "published": each entry (the diagonal included) set to -1 where its number is below `fraction`. As in
    the published code, whose replacement draw randint(0, 1) can only give 0 (i.e. -1): entries only flip
    from +1 to -1, some negatives hit only -1 entries and equal the positive, and a diagonal entry at -1
    (a node that does not reach itself) gives a negative away on sight.
    "clean": `flip_pairs`, a negative that keeps what every answer has (symmetry, a +1 diagonal) and
    differs from the positive in both directions.
    """
    if kind == "published":
        return torch.where(uniform < fraction, torch.full_like(y, -1.0), y)
    if kind == "clean":
        return flip_pairs(y, fraction, uniform)
    raise ValueError(f"corruption kind = {kind!r} is unknown; allowed: {', '.join(CORRUPTIONS)}")


def flip_pairs(y: Tensor, fraction: float, uniform: Tensor) -> Tensor:
    """Each node pair i < j flipped (y_ij and y_ji together, +1 <-> -1) where the upper triangle's number
    u_ij is below `fraction`; the diagonal never. Where no pair is hit, the pair with the smallest u_ij is
    flipped, so every negative differs from the positive; that pair is the one a growing `fraction` would
    hit first, so it is uniform over pairs and needs no further random numbers. (The lower triangle's
    numbers go unused: a pair flips as one, so the negative stays symmetric like every true answer.)"""
    n = math.isqrt(y.shape[-1])
    upper = torch.ones(n, n, dtype=torch.bool, device=y.device).triu(1)
    u = uniform.view(*y.shape[:-1], n, n).masked_fill(~upper, 2.0)  # 2.0: above any fraction, never the smallest
    hit = u < fraction
    first = F.one_hot(u.flatten(-2).argmin(-1), n * n).view_as(hit).bool()
    hit = hit | (first & ~hit.flatten(-2).any(-1)[..., None, None])
    hit = hit | hit.transpose(-1, -2)
    return torch.where(hit.flatten(-2), -y, y)


# -- metrics and yardsticks ------------------------------------------------------------------------------
def connectivity_scores(answer: Tensor, target: Tensor) -> dict[str, Tensor]:
    """Per-problem entry accuracy and graph accuracy (every entry right) [..., B], answers decoded by sign."""
    right = (answer > 0) == (target > 0)
    return {"entry_accuracy": right.float().mean(dim=-1), "graph_accuracy": right.all(dim=-1).float()}


def within_hops(adjacency: Tensor, hops: int) -> Tensor:
    """Boolean [B, n, n]: j is at most `hops` edges from i (a node is 0 hops from itself)."""
    eye = torch.eye(adjacency.shape[-1], dtype=torch.bool, device=adjacency.device)
    step, reach = (adjacency | eye).float(), eye.float().expand_as(adjacency)
    for _ in range(hops):
        reach = (reach @ step).clamp(max=1.0)
    return reach > 0


@lru_cache(maxsize=16)
def majority_label(nodes: int, density: float) -> bool:
    """The more frequent off-diagonal answer on the training distribution (fit on a seed of its own)."""
    generator = torch.Generator().manual_seed(set_seed(nodes, density, role=1))
    reach = reachability(random_adjacency(FIT_SAMPLES, nodes, density, generator))
    off = ~torch.eye(nodes, dtype=torch.bool)
    return bool(reach[:, off].float().mean() > 0.5)


def connectivity_yardsticks(problems: GraphProblems, train_nodes: int = TRAIN_NODES,
                            density: float = DENSITY) -> dict[str, dict[str, float]]:
    """What trivial predictors score: yardstick -> metric -> mean over the set."""
    n = problems.nodes
    adjacency = problems.x.view(-1, n, n) > 0
    eye = torch.eye(n, dtype=torch.bool).expand_as(adjacency)
    majority = eye | torch.full_like(adjacency, majority_label(train_nodes, density))
    guesses = {
        "adjacent": adjacency,  # connected iff adjacent, taken literally (so the diagonal is wrong)
        "all_connected": torch.ones_like(adjacency),
        "majority": majority,  # the training distribution's majority off the diagonal, self-reach on it
        **{f"within_{k}_hops": within_hops(adjacency, k) for k in HOPS},
    }
    return {name: {metric: value.mean().item()
                   for metric, value in connectivity_scores(to_pm1(guess), problems.y).items()}
            for name, guess in guesses.items()}


# -- energy model ----------------------------------------------------------------------------------------
@dataclass
class GraphCondition(Condition):
    pairs: Tensor  # the adjacency's pair embedding [P, B, n, n, H]
    film: Tensor  # per-layer FiLM (scale, shift) [P, B, L, 2H]


# max first (the default): measured on the quick model, 400 steps of max beat 800 of mean on every set
# (NOTES_graph.md); a mean dilutes one path's evidence over the n middle nodes as n grows
AGGREGATIONS = ("max", "mean", "both")


def path_mean(left: Tensor, right: Tensor) -> Tensor:
    """(1/n) sum_k left_ik * right_kj per channel [B, n, n, H]: one batched matmul, nothing of size n^3 H."""
    return torch.einsum("bikh,bkjh->bijh", left, right) / left.shape[1]


def path_max(left: Tensor, right: Tensor) -> Tensor:
    """max_k left_ik * right_kj per channel [B, n, n, H], the Neural Logic Machine's "there is a k".

    The best k is found without autograd, one k at a time (never n^3 H numbers at once); the result is
    then the product at that k, gathered, whose gradient is the max's (ties, which floats make rare, go to
    the first k where torch.amax would split them)."""
    with torch.no_grad():  # in place, the index in bytes (n <= 64): the search is most of the max's cost
        best = left[:, :, :1] * right[:, None, 0]
        product, better = torch.empty_like(best), torch.empty_like(best, dtype=torch.bool)
        where = torch.zeros_like(best, dtype=torch.uint8)
        for k in range(1, left.shape[1]):
            torch.mul(left[:, :, k:k + 1], right[:, None, k], out=product)
            torch.gt(product, best, out=better)
            torch.maximum(best, product, out=best)
            where.masked_fill_(better, k)
        where = where.long()
    return left.gather(2, where) * right.gather(1, where)


def aggregate_paths(left: Tensor, right: Tensor, aggregation: str) -> Tensor:
    """Paths through a middle node k [B, n, n, H] (mean or max), or both side by side [B, n, n, 2H]."""
    if aggregation == "mean":
        return path_mean(left, right)
    if aggregation == "max":
        return path_max(left, right)
    return torch.cat([path_mean(left, right), path_max(left, right)], dim=-1)


class TriangleBlock(nn.Module):
    """h_ij += MLP([h_ij, agg_k a(h_ik) * b(h_kj)]) with FiLM: composes paths like a boolean A @ A, the
    aggregate over the middle node k a mean, a max or both (`aggregate_paths`)."""

    def __init__(self, hidden: int, aggregation: str = "max"):
        super().__init__()
        self.aggregation = aggregation
        self.norm = nn.LayerNorm(hidden)
        self.left, self.right = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.mix = nn.Linear((3 if aggregation == "both" else 2) * hidden, hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        z = self.norm(h)
        paths = aggregate_paths(self.left(z), self.right(z), self.aggregation)
        z = self.mix(torch.cat([z, paths], dim=-1)) * (1 + scale) + shift
        return h + self.out(F.silu(z))


@register_model("graph", options={
    "hidden_dim": int_in(1, 4096, 64),
    "layers": int_in(1, 64, 3),
    "time_dim": Option(int, 64, lambda v: 4 <= v <= 4096 and v % 2 == 0, "an even int in [4, 4096]"),
    "aggregation": one_of(*AGGREGATIONS),
})
class GraphEnergyModel(EnergyModel):
    """E(x, y, t) = sum over pairs (i, j) of |W h_ij|^2, h from a few triangle blocks over the n x n pairs.

    Pair features: (a_ij, self-pair flag) from the condition, (y_ij, y_ji) from the answer. No weight
    depends on n, so a model trained on 12 nodes scores 20-node graphs unchanged. The energy sums over
    pairs so that each entry's gradient (the denoiser) keeps its scale at any n. One run at a time
    (packs = False); grad_y E is autograd's.
    """

    def __init__(self, task: Any, runs: int = 1, hidden_dim: int = 64, layers: int = 3, time_dim: int = 64,
                 aggregation: str = "max"):
        super().__init__(task, runs)
        if math.isqrt(task.out_dim) ** 2 != task.out_dim or task.inp_dim != task.out_dim:
            raise ValueError(f"model 'graph' needs n x n conditions and answers (task 'connectivity'), "
                             f"got {task.inp_dim} inputs and {task.out_dim} outputs")
        self.hidden_dim, self.layers = hidden_dim, layers
        self.embed_x, self.embed_y = nn.Linear(2, hidden_dim), nn.Linear(2, hidden_dim)
        self.time_mlp = nn.Sequential(SinusoidalPosEmb(time_dim), nn.Linear(time_dim, time_dim), nn.GELU(),
                                      nn.Linear(time_dim, time_dim))
        self.film = nn.Linear(time_dim, layers * 2 * hidden_dim)
        self.blocks = nn.ModuleList(TriangleBlock(hidden_dim, aggregation) for _ in range(layers))
        self.readout = nn.Linear(hidden_dim, hidden_dim)

    def condition(self, x: Tensor, t: Tensor, num_timesteps: int) -> GraphCondition:
        """x [P, B, n^2] adjacency in +-1, t [P, B] -> pair embedding and FiLM (num_timesteps: unused)."""
        n = math.isqrt(x.shape[-1])
        adjacency = x.view(*x.shape[:-1], n, n)
        diag = torch.eye(n, device=x.device, dtype=x.dtype).expand_as(adjacency)
        pairs = self.embed_x(torch.stack([adjacency, diag], dim=-1))
        embedding = self.time_mlp[0](t.reshape(-1)).to(x.dtype)  # sinusoids come in float32: cast before the layers
        film = self.film(self.time_mlp[1:](embedding)).view(*t.shape, self.layers, 2 * self.hidden_dim)
        return GraphCondition(pairs, film)

    def energy(self, cond: GraphCondition, y: Tensor) -> Tensor:
        """y [P, B, n^2] or [P, k, B, n^2] (cond broadcast to it: k answers share a condition) -> [..., 1]."""
        lead = y.shape[:-1]
        pairs = cond.pairs.expand(*lead, *cond.pairs.shape[-3:])  # views over the k stacked answers, no copy
        film = cond.film.expand(*lead, *cond.film.shape[-2:])
        n = math.isqrt(y.shape[-1])
        grid = y.reshape(-1, n, n)
        h = pairs.reshape(-1, n, n, self.hidden_dim) + self.embed_y(torch.stack([grid, grid.transpose(1, 2)], -1))
        film = film.reshape(-1, self.layers, 2, 1, 1, self.hidden_dim)
        for layer, block in enumerate(self.blocks):
            h = block(h, film[:, layer, 0], film[:, layer, 1])
        energy = self.readout(h).pow(2).sum(dim=(1, 2, 3))
        return energy.view(*lead, 1)


# -- the task ----------------------------------------------------------------------------------------------
def _node_counts(value: list) -> bool:
    return all(isinstance(n, int) and not isinstance(n, bool) and 2 <= n <= 64 for n in value) and len(set(value)) == len(value)


@register_task
class ConnectivityTask(Task):
    """Reachability in random undirected graphs: x the adjacency, y the reachability matrix, both in +-1.

    Sets: "id" at `nodes`, "ood<n>" for each of `harder` (larger graphs; their answers have n^2 entries,
    so each set brings its own noise of its own shape). Metrics: graph accuracy (every entry right) and
    entry accuracy, answers decoded by sign.
    """

    name = "connectivity"
    title = "graph connectivity"
    options = {
        "nodes": int_in(2, 64, TRAIN_NODES),
        "density": Option(float, DENSITY, lambda v: 0 < v <= 1, "a float in (0, 1]"),
        "harder": Option(list, list(HARDER_NODES), _node_counts, "a list of distinct ints in [2, 64]"),
        "keep_degree": Option(bool, False, lambda v: True, "true or false"),
    }
    metrics = (Metric("graph_accuracy", True, "graph accuracy"), Metric("entry_accuracy", True, "entry accuracy"))
    answer_bound = 1.0
    defaults = {"mining.loss_scale": 0.05, "model.name": "graph"}
    nodes: int
    density: float
    harder: list
    keep_degree: bool

    @classmethod
    def check(cls, options: Mapping[str, Any]) -> str:
        if any(n <= options["nodes"] for n in options["harder"]):  # ood<nodes> would be the id set again
            return (f"task['harder'] = {options['harder']} is invalid: each node count must be above "
                    f"task['nodes'] = {options['nodes']} (the harder sets hold larger graphs)")
        return ""

    @property
    def inp_dim(self) -> int:
        return self.nodes * self.nodes

    @property
    def out_dim(self) -> int:
        return self.nodes * self.nodes

    def sample(self, batch: int, generator: torch.Generator) -> Batch:
        problems = sample_graphs(batch, self.nodes, self.density, generator)
        return Batch(problems.x, problems.y)

    def held_out(self, num_samples: int) -> dict[str, HeldOutSet]:
        sets = held_out_graphs(num_samples, self.nodes, tuple(self.harder), self.density, self.keep_degree)
        return {name: HeldOutSet(p.x, p.y, _start_noise(p.y, p.nodes)) for name, p in sets.items()}

    def score(self, answer: Tensor, data: HeldOutSet) -> dict[str, Tensor]:
        return connectivity_scores(answer, data.y.to(answer.device))

    def yardsticks(self, data: HeldOutSet) -> dict[str, dict[str, float]]:
        problems = GraphProblems(data.x.cpu(), data.y.cpu(), math.isqrt(data.y.shape[-1]))
        return connectivity_yardsticks(problems, self.nodes, self.density)

    @staticmethod
    def corrupt(y: Tensor, mask: Tensor | None, fraction: float, uniform: Tensor, kind: str = "published") -> Tensor:
        return corrupt_reachability(y, fraction, uniform, kind)


def _start_noise(y: Tensor, nodes: int) -> Tensor:
    """The sampler's fixed starting noise for a held-out set of y's shape (a seed of its own per node count)."""
    generator = torch.Generator().manual_seed(mix_seed(_NAME_SEED, nodes, y.shape[0], 3))
    return torch.randn(y.shape, generator=generator)
