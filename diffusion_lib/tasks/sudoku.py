"""Sudoku: fill a 9 x 9 grid from its givens (IRED's Sudoku task), puzzles generated from seeds.

The puzzles (solver, carving, transforms, caches) are made in `sudoku_puzzles`; here are the task
(`task.dataset: sudoku`), its 'random' negatives, metrics, yardsticks and energy model
(`model.name: sudoku_net`). With `unique` (the default) every puzzle, training and held-out, has one
solution: training puzzles are drawn from a carved pool under random transforms.

Encoding, cell-major (entry = 9 * cell + digit, cell = 9 * row + col, digit 0..8 for 1..9):
  condition x [B, 729]: the givens one-hot in 0/1 (a blank cell is all zeros);
  answer y [B, 729]: the solution one-hot in +-1; mask [B, 729] bool: True on the 9 entries of a given.
Answers are decoded by the argmax over each cell's 9 entries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lib.models import Condition, EnergyModel, SinusoidalPosEmb, register_model
from diffusion_lib.registry import Option, int_in
from diffusion_lib.tasks.base import Batch, HeldOutSet, Metric, Task, mix_seed, register_task
from diffusion_lib.tasks.sudoku_puzzles import (HARDER_GIVENS, ID_GIVENS, TRAIN_POOL, SudokuProblems, NAME_SEED,
                                                board_valid, carving_seconds, held_out_puzzles, propagate,
                                                propagation_solves, puzzle_grid, sample_puzzles, solve, training_pool,
                                                training_puzzles)


# -- negatives -------------------------------------------------------------------------------------------
CORRUPTIONS = ("published", "clean")


def corrupt_grid(y: Tensor, mask: Tensor | None, fraction: float, uniform: Tensor, kind: str = "published") -> Tensor:
    """The 'random' negatives: blank cells of the solution y [..., 729] re-drawn, each with probability `fraction`.

    `uniform`: random numbers in [0, 1) of y's shape (the run's own draws): a blank cell is hit where its
    first entry's number is below `fraction`, and its second number picks the new digit.
    'published': floor(9 u), a uniform digit, as the published code (which re-draws every cell; the
    givens are held anyway), so 1 time in 9 the digit stays and some negatives equal the positive.
    'clean': always a different digit, (old + 1 + floor(8 u)) mod 9, and the blank cell with the smallest
    first number is hit too, so every puzzle with a blank cell changes in at least one cell.
    """
    if kind not in CORRUPTIONS:
        raise ValueError(f"corruption kind = {kind!r}: must be one of {', '.join(CORRUPTIONS)}")
    cells = y.view(*y.shape[:-1], 81, 9)
    draws = uniform.view(cells.shape)
    blank = torch.ones_like(draws[..., 0], dtype=torch.bool)
    if mask is not None:
        blank = ~mask.view(*mask.shape[:-1], 81, 9)[..., 0]
    hit = (draws[..., 0] < fraction) & blank
    if kind == "published":
        digits = (draws[..., 1] * 9).long().clamp(max=8)
    else:
        digits = (cells.argmax(dim=-1) + 1 + (draws[..., 1] * 8).long().clamp(max=7)) % 9
        first = torch.where(blank, draws[..., 0], 2.0).argmin(dim=-1, keepdim=True)
        hit |= torch.zeros_like(hit).scatter(-1, first, True) & blank
    fresh = F.one_hot(digits, 9).to(y.dtype) * 2 - 1
    return torch.where(hit.unsqueeze(-1), fresh, cells).reshape(y.shape)


# -- metrics and yardsticks ------------------------------------------------------------------------------
def grid_scores(digits: Tensor, solutions: Tensor, givens: Tensor) -> dict[str, Tensor]:
    """Per-problem board accuracy (valid and every given kept) and blank-cell accuracy [..., B].

    digits [..., B, 81] in 0..8, or -1 for a cell left unfilled (always wrong, never valid).
    """
    filled = (digits >= 0).all(dim=-1)
    valid = board_valid(digits.clamp(min=0)) & filled
    right = digits == solutions
    kept = (right | ~givens).all(dim=-1)
    blanks = (~givens).sum(dim=-1).clamp(min=1)
    return {"board_accuracy": (valid & kept).float(),
            "blank_accuracy": (right & ~givens).sum(dim=-1) / blanks}


def decode(answer: Tensor) -> Tensor:
    """Answers [..., 729] -> digits [..., 81] by the argmax over each cell's entries."""
    return answer.view(*answer.shape[:-1], 81, 9).argmax(dim=-1)


def sudoku_scores(answer: Tensor, problems: SudokuProblems) -> dict[str, Tensor]:
    """The task's metrics per problem [..., B] for answers [..., B, 729]."""
    return grid_scores(decode(answer), problems.solutions.to(answer.device), problems.givens.to(answer.device))


def random_fill(problems: SudokuProblems, seed: int = 0) -> Tensor:
    """Givens kept, every blank a uniformly random digit: digits [B, 81]."""
    generator = torch.Generator().manual_seed(mix_seed(NAME_SEED, seed, 2))
    noise = torch.randint(9, problems.solutions.shape, generator=generator)
    return torch.where(problems.givens, problems.solutions, noise)


def solver_fill(problems: SudokuProblems) -> Tensor:
    """The exact solver's first solution of each puzzle (a valid board; may differ from the generated one)."""
    grids = [solve(puzzle_grid(problems, i), cap=1)[1] for i in range(problems.x.shape[0])]
    return torch.tensor(grids, dtype=torch.long) - 1


def group_means(board: Tensor, solved: Tensor) -> dict[str, float]:
    """Mean board accuracy over the puzzles propagation alone solves and over the rest (NaN: no such puzzle)."""
    return {name: board[group].float().mean().item() for name, group in (("board_acc_propagation", solved),
                                                                      ("board_acc_search", ~solved))}


def sudoku_yardsticks(problems: SudokuProblems, with_solver: bool = True) -> dict[str, dict[str, float]]:
    """yardstick -> metric -> mean over the set: random fill, propagation alone, the exact solver."""
    fills = {"random_fill": random_fill(problems), "propagation": propagate(problems)}
    if with_solver:
        fills["solver"] = solver_fill(problems)
    solved = propagation_solves(problems)
    marks = {}
    for name, digits in fills.items():
        scores = grid_scores(digits, problems.solutions, problems.givens)
        marks[name] = {metric: value.float().mean().item() for metric, value in scores.items()}
        marks[name].update(group_means(scores["board_accuracy"], solved))
    return marks


# -- energy model ----------------------------------------------------------------------------------------
@dataclass
class SudokuCondition(Condition):
    cells: Tensor  # the givens' cell embedding [P, B, 81, H]
    film: Tensor  # per-layer FiLM (scale, shift) [P, B, L, 2H]


class UnitBlock(nn.Module):
    """h_c += MLP([h_c, mean of c's row, of its column, of its box]) with FiLM: Sudoku's constraint graph."""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.mix, self.out = nn.Linear(4 * hidden, hidden), nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        z = self.norm(h)
        grid = z.view(-1, 3, 3, 3, 3, z.shape[-1])  # (band, row in band, stack, col in stack)
        row = grid.mean(dim=(3, 4), keepdim=True).expand_as(grid)
        col = grid.mean(dim=(1, 2), keepdim=True).expand_as(grid)
        box = grid.mean(dim=(2, 4), keepdim=True).expand_as(grid)
        pooled = torch.cat([grid, row, col, box], dim=-1).view(*z.shape[:-1], -1)
        z = self.mix(pooled) * (1 + scale) + shift
        return h + self.out(F.silu(z))


@register_model("sudoku_net", options={
    "hidden_dim": int_in(1, 4096, 128),
    "layers": int_in(1, 64, 6),
    "time_dim": Option(int, 64, lambda v: 4 <= v <= 4096 and v % 2 == 0, "an even int in [4, 4096]"),
})
class SudokuEnergyModel(EnergyModel):
    """E(x, y, t) = sum over cells of |W h_c|^2, h from residual blocks over the 81 cells.

    Each block is a per-cell (1 x 1) layer over the cell's features and the means over its row,
    column and box (the cells it must differ from), with time FiLM. Inputs per cell: the answer's 9
    entries, the givens' 9 entries and a given flag. One run at a time (packs = False); grad_y E is
    autograd's.
    """

    def __init__(self, task: Any, runs: int = 1, hidden_dim: int = 128, layers: int = 6, time_dim: int = 64):
        super().__init__(task, runs)
        if (task.inp_dim, task.out_dim) != (729, 729):
            raise ValueError(f"model 'sudoku_net' needs 9 x 9 x 9 conditions and answers (task 'sudoku'), "
                             f"got {task.inp_dim} inputs and {task.out_dim} outputs")
        self.hidden_dim, self.layers = hidden_dim, layers
        self.embed_x, self.embed_y = nn.Linear(10, hidden_dim), nn.Linear(9, hidden_dim)
        self.time_mlp = nn.Sequential(SinusoidalPosEmb(time_dim), nn.Linear(time_dim, time_dim), nn.GELU(),
                                      nn.Linear(time_dim, time_dim))
        self.film = nn.Linear(time_dim, layers * 2 * hidden_dim)
        self.blocks = nn.ModuleList(UnitBlock(hidden_dim) for _ in range(layers))
        self.readout = nn.Linear(hidden_dim, hidden_dim)

    def condition(self, x: Tensor, t: Tensor, num_timesteps: int) -> SudokuCondition:
        """x [P, B, 729] givens one-hot, t [P, B] -> cell embedding and FiLM (num_timesteps: unused)."""
        given = x.view(*x.shape[:-1], 81, 9)
        cells = self.embed_x(torch.cat([given, given.sum(-1, keepdim=True)], dim=-1))
        embedding = self.time_mlp[0](t.reshape(-1)).to(x.dtype)  # sinusoids come in float32: cast before the layers
        film = self.film(self.time_mlp[1:](embedding)).view(*t.shape, self.layers, 2 * self.hidden_dim)
        return SudokuCondition(cells, film)

    def energy(self, cond: SudokuCondition, y: Tensor) -> Tensor:
        """y [P, B, 729] or [P, k, B, 729] (cond broadcast to it: k answers share a condition) -> [..., 1]."""
        lead = y.shape[:-1]
        cells = cond.cells.expand(*lead, *cond.cells.shape[-2:])  # views over the k stacked answers, no copy
        film = cond.film.expand(*lead, *cond.film.shape[-2:])
        h = cells.reshape(-1, 81, self.hidden_dim) + self.embed_y(y.reshape(-1, 81, 9))
        film = film.reshape(-1, self.layers, 2, 1, self.hidden_dim)
        for layer, block in enumerate(self.blocks):
            h = block(h, film[:, layer, 0], film[:, layer, 1])
        energy = self.readout(h).pow(2).sum(dim=(1, 2))
        return energy.view(*lead, 1)


# -- the task ----------------------------------------------------------------------------------------------
def _givens_range(value: list) -> bool:
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return len(value) == 2 and ints and 0 <= value[0] <= value[1] <= 80  # a board without blanks scores nothing


def _range_option(default: tuple[int, int]) -> Option:
    return Option(list, list(default), _givens_range, "a list [low, high] of ints, 0 <= low <= high <= 80 (a "
                  "puzzle needs a blank cell)")


def _problems(data: HeldOutSet) -> SudokuProblems:
    """A held-out set as the module's problems (solutions decoded from y, given cells from the mask), on the CPU."""
    y, mask = data.y.cpu(), data.mask.cpu()
    return SudokuProblems(data.x.cpu(), y, mask, decode(y), mask.view(-1, 81, 9)[..., 0])


def group_weights(solved: Tensor) -> Tensor:
    """[N, 2]: each puzzle's weight N / N_g in its group g (0: propagation solves it, 1: it does not), 0 in
    the other, so a metric's plain mean over the set of value * weight is the group's mean (NaN: empty group)."""
    groups = torch.stack([solved, ~solved], dim=-1).float()
    return groups * solved.numel() / groups.sum(dim=0)


@dataclass
class SudokuSet(HeldOutSet):
    """A held-out Sudoku set that knows which puzzles propagation alone solves (as `group_weights`)."""

    groups: Tensor | None = None

    def _parts(self) -> list[Tensor | None]:
        return [*super()._parts(), self.groups]


@register_task
class SudokuTask(Task):
    """Fill a 9 x 9 grid from its givens: x the givens one-hot, y the solution one-hot in +-1, the givens'
    entries held fixed (the mask). With `unique` every puzzle has one solution: training puzzles come from
    a pool of `train_pool` carved puzzles (givens in `givens`) under random transforms; held-out "id"
    (`givens`) and "ood" (`harder`) are carved (the carving's floor, ~22 givens, bounds how sparse "ood"
    gets; see README), and "hard" holds minimal puzzles propagation cannot finish. Without it the givens
    are random cells (several solutions possible) and there is no "hard" set. Board accuracy is also
    reported over the puzzles propagation solves and over the rest (the search)."""

    name = "sudoku"
    title = "Sudoku"
    options = {
        "givens": _range_option(ID_GIVENS),
        "harder": _range_option(HARDER_GIVENS),
        "unique": Option(bool, True, lambda v: True, "true or false"),
        "train_pool": int_in(1, 1_000_000, TRAIN_POOL),
    }
    metrics = (Metric("board_accuracy", True, "board accuracy"), Metric("blank_accuracy", True, "blank-cell accuracy"),
               Metric("board_acc_propagation", True, "board accuracy where propagation solves"),
               Metric("board_acc_search", True, "board accuracy where propagation does not solve"))
    answer_bound = 1.0
    defaults = {"mining.loss_scale": 0.05, "diffusion.inference_steps": 20, "model.name": "sudoku_net"}
    probe_options = {"train_pool": 16}  # a step draws from a pool of any size alike: the probe carves no large one
    inp_dim = 729
    out_dim = 729
    givens: list
    harder: list
    unique: bool
    train_pool: int

    def sample(self, batch: int, generator: torch.Generator) -> Batch:
        if self.unique:
            problems = training_puzzles(batch, generator, training_pool(self.train_pool, tuple(self.givens)))
        else:
            problems = sample_puzzles(batch, tuple(self.givens), generator)
        return Batch(problems.x, problems.y, problems.mask)

    def held_out(self, num_samples: int) -> dict[str, HeldOutSet]:
        sets = held_out_puzzles(num_samples, tuple(self.givens), tuple(self.harder), self.unique)
        return {name: SudokuSet(p.x, p.y, _start_noise(p.y, role), p.mask, group_weights(propagation_solves(p)))
                for role, (name, p) in enumerate(sets.items())}

    def preparation_seconds(self, num_samples: int) -> float:
        if not self.unique:  # random givens: nothing is carved
            return 0.0
        givens, harder = tuple(self.givens), tuple(self.harder)
        return carving_seconds([("train", self.train_pool, givens), ("unique", num_samples, givens),
                                ("unique", num_samples, harder), ("hard", num_samples, (0, 0))])

    def score(self, answer: Tensor, data: HeldOutSet) -> dict[str, Tensor]:
        cells = data.mask.view(*data.mask.shape[:-1], 81, 9)[..., 0].to(answer.device)
        scores = grid_scores(decode(answer), decode(data.y).to(answer.device), cells)
        weights = data.groups.to(answer.device, scores["board_accuracy"].dtype)
        scores["board_acc_propagation"] = scores["board_accuracy"] * weights[:, 0]
        scores["board_acc_search"] = scores["board_accuracy"] * weights[:, 1]
        return scores

    def yardsticks(self, data: HeldOutSet) -> dict[str, dict[str, float]]:
        return sudoku_yardsticks(_problems(data))

    @staticmethod
    def corrupt(y: Tensor, mask: Tensor | None, fraction: float, uniform: Tensor, kind: str = "published") -> Tensor:
        return corrupt_grid(y, mask, fraction, uniform, kind)


def _start_noise(y: Tensor, role: int) -> Tensor:
    """The sampler's fixed starting noise for a held-out set (a seed of its own per set)."""
    generator = torch.Generator().manual_seed(mix_seed(NAME_SEED, y.shape[0], role, 3))
    return torch.randn(y.shape, generator=generator)
