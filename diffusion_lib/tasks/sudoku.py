"""Sudoku: fill a 9 x 9 grid from its givens (IRED's Sudoku task), puzzles generated from seeds.

Solutions: a pool of grids filled by randomised backtracking (fixed by a seed of its own, cached), each
drawn grid then put through a random validity-preserving transformation in batched torch on the
generator's device: digit relabelling, row permutations within bands, band permutations, the same for
columns and stacks, and a transpose. Puzzles: a uniformly random number of givens in a range (in
distribution 30-45, harder 17-28) at uniformly random cells, so a puzzle may have several solutions
(`solve`, exact with the solution count capped at 2, says which); `unique_puzzles` instead carves the
givens so that one solution remains (tens of milliseconds a puzzle on the CPU).

Encoding, cell-major (entry = 9 * cell + digit, cell = 9 * row + col, digit 0..8 for 1..9):
  condition x [B, 729]: the givens one-hot in 0/1 (a blank cell is all zeros);
  answer y [B, 729]: the solution one-hot in +-1; mask [B, 729] bool: True on the 9 entries of a given.
Answers are decoded by the argmax over each cell's 9 entries.

The task (`task.dataset: sudoku`) and its energy model (`model.name: sudoku_net`) are registered at the
end of this module. Carved (unique) held-out sets take minutes to make, so they are cached on disk
(`cache_folder`, keyed by everything that fixes them); a missing or damaged cache file is made again.
"""
from __future__ import annotations

import io
import os
import random
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lib.harness.io import atomic_write_bytes
from diffusion_lib.models import Condition, EnergyModel, SinusoidalPosEmb, register_model
from diffusion_lib.registry import Option, int_in
from diffusion_lib.tasks.base import Batch, HeldOutSet, Metric, Task, mix_seed, register_task

ID_GIVENS = (30, 45)
HARDER_GIVENS = (17, 28)
POOL_SIZE = 256
_NAME_SEED = zlib.crc32(b"sudoku")
_ROWS, _COLS = torch.arange(81) // 9, torch.arange(81) % 9
_BOXES = (_ROWS // 3) * 3 + _COLS // 3
# UNITS[u] = the 9 cells of unit u: rows 0-8, columns 9-17, boxes 18-26
UNITS = torch.stack([torch.nonzero(key == i).flatten() for key in (_ROWS, _COLS, _BOXES) for i in range(9)])


@dataclass
class SudokuProblems:
    x: Tensor  # givens one-hot 0/1 [B, 729]
    y: Tensor  # solution one-hot +-1 [B, 729]
    mask: Tensor  # bool [B, 729], True on given cells' entries
    solutions: Tensor  # digits 0..8 [B, 81]
    givens: Tensor  # bool [B, 81]


# -- an exact solver (bitmask backtracking, fewest candidates first) -------------------------------------
_FULL = (1 << 9) - 1
_UNIT_CELLS = [[int(c) for c in unit] for unit in UNITS]
_PEERS = [sorted({c for unit in _UNIT_CELLS if cell in unit for c in unit} - {cell}) for cell in range(81)]
_PLACES = [(cell // 9, cell % 9, (cell // 27) * 3 + (cell % 9) // 3) for cell in range(81)]  # (row, col, box)


def solve(grid: list[int], cap: int = 2, rng: random.Random | None = None) -> tuple[int, list[int] | None]:
    """(number of solutions, capped at `cap`; the first solution found) of a grid of digits 1..9, 0 = blank.

    Depth-first search that branches on a digit forced by a hidden single, else on the blank with the
    fewest candidates; with `rng` the candidates are tried in random order (to fill a grid at random).
    """
    search = _Search(grid, cap, rng)
    if not search.place_givens():
        return 0, None  # the givens already clash
    search.run()
    return search.count, search.first


class _Search:
    """The solver's state: the grid and each row's, column's and box's digit bits."""

    def __init__(self, grid: list[int], cap: int, rng: random.Random | None):
        self.cells, self.cap, self.rng = list(grid), cap, rng
        self.used = ([0] * 9, [0] * 9, [0] * 9)  # rows, columns, boxes
        self.blanks = [cell for cell in range(81) if not grid[cell]]
        self.count, self.first = 0, None

    def place_givens(self) -> bool:
        """Record the givens' digits; False if two of them clash."""
        rows, cols, boxes = self.used
        for cell, digit in enumerate(self.cells):
            if digit:
                bit, (r, c, b) = 1 << (digit - 1), _PLACES[cell]
                if (rows[r] | cols[c] | boxes[b]) & bit:
                    return False
                rows[r] |= bit; cols[c] |= bit; boxes[b] |= bit
        return True

    def _branch(self) -> tuple[int, list[int]] | tuple[()] | None:
        """(cell, digits to try); () when the grid is full; None at a dead end."""
        rows, cols, boxes = self.used
        free, best, best_count = {}, -1, 10
        for cell in self.blanks:
            if not self.cells[cell]:
                r, c, b = _PLACES[cell]
                free[cell] = _FULL & ~(rows[r] | cols[c] | boxes[b])
                count = free[cell].bit_count()
                if count == 0:
                    return None  # a blank with no digit left
                if count < best_count:
                    best, best_count = cell, count
        if best < 0:
            return ()
        if best_count > 1:
            forced = _hidden_single(free, self.used)
            if forced != ():
                return forced  # None: some unit has a digit with nowhere to go
        return best, [d for d in range(9) if free[best] >> d & 1]

    def run(self) -> None:
        branch = self._branch()
        if branch == ():  # no blank left: a solution
            self.count += 1
            self.first = self.first or list(self.cells)
            return
        if branch is None:
            return
        cell, digits = branch
        if self.rng is not None:
            self.rng.shuffle(digits)
        rows, cols, boxes = self.used
        r, c, b = _PLACES[cell]
        for d in digits:
            bit = 1 << d
            self.cells[cell] = d + 1
            rows[r] |= bit; cols[c] |= bit; boxes[b] |= bit
            self.run()
            rows[r] ^= bit; cols[c] ^= bit; boxes[b] ^= bit
            self.cells[cell] = 0
            if self.count >= self.cap:
                return


def _hidden_single(free: dict[int, int], used: tuple[list[int], ...]) -> tuple[int, list[int]] | tuple[()] | None:
    """A (cell, [digit]) that is the only place for a digit in some unit; () if none; None on a dead end.

    `free` maps each blank to its candidate bits; `used` holds the rows', columns' and boxes' digit bits.
    Pruning dead ends here keeps the search's rare very long runs (seconds on sparse puzzles) away.
    """
    for unit, cells in enumerate(_UNIT_CELLS):
        once = twice = 0
        for cell in cells:
            bits = free.get(cell, 0)
            twice |= once & bits
            once |= bits
        if _FULL & ~used[unit // 9][unit % 9] & ~once:
            return None
        single = once & ~twice
        if single:
            bit = single & -single
            cell = next(cell for cell in cells if free.get(cell, 0) & bit)
            return cell, [bit.bit_length() - 1]
    return ()


@lru_cache(maxsize=4)
def solution_pool(size: int = POOL_SIZE, held_out: bool = False) -> Tensor:
    """`size` random solution grids (randomised backtracking fills), digits 0..8 [size, 81], from a fixed seed.

    Training and the held-out sets draw from different pools, so no held-out solution is a transform
    of a grid seen in training (short of a chance coincidence).
    """
    # the fills follow `solve`'s search order: a change to the solver changes every generated set
    rng = random.Random(mix_seed(_NAME_SEED, size, 1, int(held_out)))
    grids = [solve([0] * 81, cap=1, rng=rng)[1] for _ in range(size)]
    return torch.tensor(grids, dtype=torch.long) - 1


# -- data ------------------------------------------------------------------------------------------------
def _line_permutation(batch: int, generator: torch.Generator) -> Tensor:
    """[B, 9] row (or column) orders that keep the bands: a random band order, a random order within each."""
    device = generator.device
    bands = torch.rand((batch, 3), generator=generator, device=device).argsort(dim=-1)
    within = torch.rand((batch, 3, 3), generator=generator, device=device).argsort(dim=-1)
    return (bands.unsqueeze(-1) * 3 + within).flatten(1)


def random_solutions(batch: int, generator: torch.Generator, pool: Tensor | None = None) -> Tensor:
    """[B, 81] solution digits 0..8: pool grids under random relabelling, line permutations and transposes."""
    device = generator.device
    pool = (solution_pool() if pool is None else pool).to(device)
    pick = torch.randint(pool.shape[0], (batch,), generator=generator, device=device)
    grids = pool[pick].view(batch, 9, 9)
    flip = torch.rand((batch, 1, 1), generator=generator, device=device) < 0.5
    grids = torch.where(flip, grids.transpose(1, 2), grids)
    rows = _line_permutation(batch, generator)
    cols = _line_permutation(batch, generator)
    grids = grids.gather(1, rows.unsqueeze(-1).expand(-1, -1, 9)).gather(2, cols.unsqueeze(1).expand(-1, 9, -1))
    relabel = torch.rand((batch, 9), generator=generator, device=device).argsort(dim=-1)
    return relabel.gather(1, grids.flatten(1))


def random_givens(batch: int, givens: tuple[int, int], generator: torch.Generator) -> Tensor:
    """bool [B, 81]: a uniform count in [lo, hi] of givens per puzzle, at uniformly random cells."""
    device = generator.device
    counts = torch.randint(givens[0], givens[1] + 1, (batch, 1), generator=generator, device=device)
    ranks = torch.rand((batch, 81), generator=generator, device=device).argsort(dim=-1).argsort(dim=-1)
    return ranks < counts


def encode(solutions: Tensor, givens: Tensor) -> SudokuProblems:
    """Digits [B, 81] and given cells [B, 81] -> the task's tensors (see the module docstring)."""
    onehot = F.one_hot(solutions, 9).float()
    x = (onehot * givens.unsqueeze(-1)).flatten(1)
    mask = givens.unsqueeze(-1).expand(-1, -1, 9).flatten(1)
    return SudokuProblems(x, (onehot * 2 - 1).flatten(1), mask, solutions, givens)


def sample_puzzles(batch: int, givens: tuple[int, int], generator: torch.Generator,
                   pool: Tensor | None = None) -> SudokuProblems:
    """A batch of puzzles on the generator's device (solutions from `pool`, default the training pool)."""
    return encode(random_solutions(batch, generator, pool), random_givens(batch, givens, generator))


def set_seed(givens: tuple[int, int]) -> int:
    return mix_seed(_NAME_SEED, givens[0], givens[1])


def carve_unique(solution: list[int], target: int, rng: random.Random) -> list[bool]:
    """Given cells [81]: blank cells in random order, each only if one solution remains, down to `target`.

    Stops above `target` when no further cell can go (a minimal puzzle): sparse targets are then missed.
    Costs an exact solve per tried cell whose peers do not force it, tens of milliseconds a puzzle.
    """
    grid = [d + 1 for d in solution]
    order = list(range(81))
    rng.shuffle(order)
    count = 81
    for cell in order:
        if count <= target:
            break
        digit, grid[cell] = grid[cell], 0
        # a blank whose peers leave it one digit is forced, so the puzzle keeps its one solution: no solve
        forced = len({grid[peer] for peer in _PEERS[cell]} - {0}) == 8
        if forced or solve(grid)[0] == 1:
            count -= 1
        else:
            grid[cell] = digit
    return [bool(d) for d in grid]


def unique_puzzles(batch: int, givens: tuple[int, int], generator: torch.Generator,
                   pool: Tensor | None = None) -> SudokuProblems:
    """Like `sample_puzzles` but every puzzle has one solution: givens carved by `carve_unique` (CPU)."""
    solutions = random_solutions(batch, generator, pool).cpu()
    targets = torch.randint(givens[0], givens[1] + 1, (batch,), generator=generator, device=generator.device)
    rng = random.Random(int(torch.randint(2**62, (1,), generator=generator, device=generator.device)))
    masks = [carve_unique(solutions[b].tolist(), int(targets[b]), rng) for b in range(batch)]
    return encode(solutions, torch.tensor(masks, dtype=torch.bool))


# the version of the generated data: bump it when a change to the generator or solver changes the sets
DATA_VERSION = 1


def cache_folder() -> Path:
    """Where carved held-out sets are kept: $IRED_CACHE, else ~/.cache/ired-diffusion (safe to delete)."""
    return Path(os.environ.get("IRED_CACHE") or Path.home() / ".cache" / "ired-diffusion")


def _cache_path(num_samples: int, givens: tuple[int, int]) -> Path:
    name = f"sudoku_unique_v{DATA_VERSION}_n{num_samples}_givens{givens[0]}-{givens[1]}_pool{POOL_SIZE}_seed{set_seed(givens)}.pt"
    return cache_folder() / name


def _read_cached(path: Path, num_samples: int) -> SudokuProblems | None:
    """The cached set, or None if the file is missing, unreadable or not a set of valid boards."""
    try:
        data = torch.load(path, weights_only=True)
        solutions, givens = data["solutions"], data["givens"]
        fits = solutions.shape == givens.shape == (num_samples, 81) and (solutions.dtype, givens.dtype) == (torch.long, torch.bool)
        if fits and bool(board_valid(solutions).all()):
            return encode(solutions, givens)
    except Exception:  # anything unreadable is made again: the cache only saves time
        pass
    return None


def _write_cached(path: Path, problems: SudokuProblems) -> None:
    buffer = io.BytesIO()
    torch.save({"solutions": problems.solutions, "givens": problems.givens}, buffer)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError:  # a read-only home: the set is only made again next time
        pass


@lru_cache(maxsize=8)
def _held_out_one(num_samples: int, givens: tuple[int, int], unique: bool) -> SudokuProblems:
    if unique:
        cached = _read_cached(_cache_path(num_samples, givens), num_samples)
        if cached is not None:
            return cached
    generator = torch.Generator().manual_seed(set_seed(givens))
    make = unique_puzzles if unique else sample_puzzles
    problems = make(num_samples, givens, generator, solution_pool(POOL_SIZE, held_out=True))
    if unique:
        _write_cached(_cache_path(num_samples, givens), problems)
    return problems


def held_out_puzzles(num_samples: int, givens: tuple[int, int] = ID_GIVENS,
                     harder: tuple[int, int] = HARDER_GIVENS, unique: bool = False) -> dict[str, SudokuProblems]:
    """The fixed held-out sets on the CPU: "id" and the harder "ood" (fewer givens).

    unique=True carves the givens so that every puzzle has one solution (slower; sparse targets may be
    missed: see `carve_unique`).
    """
    return {"id": _held_out_one(num_samples, tuple(givens), unique),
            "ood": _held_out_one(num_samples, tuple(harder), unique)}


def puzzle_grid(problems: SudokuProblems, index: int) -> list[int]:
    """One puzzle as the solver's digits 1..9, 0 = blank."""
    digits = (problems.solutions[index] + 1) * problems.givens[index]
    return [int(d) for d in digits]


def unique_fraction(problems: SudokuProblems) -> float:
    """The share of puzzles whose solution is unique (exact solver, count capped at 2)."""
    counts = [solve(puzzle_grid(problems, i))[0] for i in range(problems.x.shape[0])]
    return sum(c == 1 for c in counts) / len(counts)


# -- negatives -------------------------------------------------------------------------------------------
def corrupt_grid(y: Tensor, mask: Tensor | None, fraction: float, uniform: Tensor) -> Tensor:
    """The 'random' negatives: each blank cell re-draws a uniform digit with probability `fraction`.

    `uniform`: random numbers in [0, 1) of y's shape [..., 729] (the run's own draws): a cell is hit
    where its first entry's number is below `fraction`, and its new digit is floor(9 u) of its second.
    As in the published code (which re-draws every cell; the givens are held at their values anyway)
    a re-draw may give the same digit back, so about 8/9 of the re-drawn cells change.
    """
    cells = y.view(*y.shape[:-1], 81, 9)
    draws = uniform.view(cells.shape)
    hit = draws[..., 0] < fraction
    if mask is not None:
        hit &= ~mask.view(*mask.shape[:-1], 81, 9)[..., 0]
    digits = (draws[..., 1] * 9).long().clamp(max=8)
    fresh = F.one_hot(digits, 9).to(y.dtype) * 2 - 1
    return torch.where(hit.unsqueeze(-1), fresh, cells).reshape(y.shape)


# -- metrics and yardsticks ------------------------------------------------------------------------------
def board_valid(digits: Tensor) -> Tensor:
    """bool [...]: every row, column and box of digits [..., 81] (0..8) holds each digit once."""
    onehot = F.one_hot(digits, 9)
    per_unit = onehot[..., UNITS.to(digits.device), :].sum(dim=-2)  # [..., 27, 9]
    return (per_unit == 1).all(dim=-1).all(dim=-1)


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


def propagate(problems: SudokuProblems, max_rounds: int = 81) -> Tensor:
    """Constraint propagation alone (naked and hidden singles, to a fixed point), batched.

    Returns digits [B, 81], -1 where propagation could not decide. A clash (a cell with no candidate,
    which correct givens cannot cause) just stops progress in that puzzle.
    """
    digits = torch.where(problems.givens, problems.solutions, torch.full_like(problems.solutions, -1))
    units = UNITS.to(digits.device)
    membership = torch.zeros(81, 27, dtype=torch.bool, device=digits.device)
    membership[units.flatten(), torch.arange(27, device=digits.device).repeat_interleave(9)] = True
    for _ in range(max_rounds):
        placed = F.one_hot(digits.clamp(min=0), 9).bool() & (digits >= 0).unsqueeze(-1)  # [B, 81, 9]
        used = placed[:, units].any(dim=2)  # [B, 27, 9]: digits present in each unit
        blocked = (membership.float() @ used.float()) > 0  # [B, 81, 9]
        open_ = ~blocked & (digits < 0).unsqueeze(-1)
        naked = open_.sum(-1) == 1
        hidden_unit = open_[:, units].sum(dim=2) == 1  # [B, 27, 9]: digit fits one cell of the unit
        hidden = open_ & ((membership.float() @ hidden_unit.float()) > 0)
        choice = torch.where(naked, open_.float().argmax(-1), hidden.float().argmax(-1))
        decide = naked | hidden.any(-1)
        if not decide.any():
            break
        digits = torch.where(decide, choice, digits)
    return digits


def random_fill(problems: SudokuProblems, seed: int = 0) -> Tensor:
    """Givens kept, every blank a uniformly random digit: digits [B, 81]."""
    generator = torch.Generator().manual_seed(mix_seed(_NAME_SEED, seed, 2))
    noise = torch.randint(9, problems.solutions.shape, generator=generator)
    return torch.where(problems.givens, problems.solutions, noise)


def solver_fill(problems: SudokuProblems) -> Tensor:
    """The exact solver's first solution of each puzzle (a valid board; may differ from the generated one)."""
    grids = [solve(puzzle_grid(problems, i), cap=1)[1] for i in range(problems.x.shape[0])]
    return torch.tensor(grids, dtype=torch.long) - 1


def sudoku_yardsticks(problems: SudokuProblems, with_solver: bool = True) -> dict[str, dict[str, float]]:
    """yardstick -> metric -> mean over the set: random fill, propagation alone, the exact solver."""
    fills = {"random_fill": random_fill(problems), "propagation": propagate(problems)}
    if with_solver:
        fills["solver"] = solver_fill(problems)
    return {name: {metric: value.float().mean().item()
                   for metric, value in grid_scores(digits, problems.solutions, problems.givens).items()}
            for name, digits in fills.items()}


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
    return len(value) == 2 and ints and 0 <= value[0] <= value[1] <= 81


def _range_option(default: tuple[int, int]) -> Option:
    return Option(list, list(default), _givens_range, "a list [low, high] of ints, 0 <= low <= high <= 81")


def _problems(data: HeldOutSet) -> SudokuProblems:
    """A held-out set as the module's problems (solutions decoded from y, given cells from the mask), on the CPU."""
    y, mask = data.y.cpu(), data.mask.cpu()
    return SudokuProblems(data.x.cpu(), y, mask, decode(y), mask.view(-1, 81, 9)[..., 0])


@register_task
class SudokuTask(Task):
    """Fill a 9 x 9 grid from its givens: x the givens one-hot, y the solution one-hot in +-1, the givens'
    entries held fixed (the mask). Training puzzles have a uniform number of givens in `givens` at random
    cells; held-out "id" (`givens`) and "ood" (`harder`) puzzles are carved to a unique solution when
    `unique` (so the carving's floor, ~22 givens, bounds how sparse "ood" gets; see README)."""

    name = "sudoku"
    title = "Sudoku"
    options = {
        "givens": _range_option(ID_GIVENS),
        "harder": _range_option(HARDER_GIVENS),
        "unique": Option(bool, True, lambda v: True, "true or false"),
    }
    metrics = (Metric("board_accuracy", True, "board accuracy"), Metric("blank_accuracy", True, "blank-cell accuracy"))
    answer_bound = 1.0
    defaults = {"mining.loss_scale": 0.05, "diffusion.inference_steps": 20, "model.name": "sudoku_net"}
    inp_dim = 729
    out_dim = 729
    givens: list
    harder: list
    unique: bool

    def sample(self, batch: int, generator: torch.Generator) -> Batch:
        problems = sample_puzzles(batch, tuple(self.givens), generator)
        return Batch(problems.x, problems.y, problems.mask)

    def held_out(self, num_samples: int) -> dict[str, HeldOutSet]:
        sets = held_out_puzzles(num_samples, tuple(self.givens), tuple(self.harder), self.unique)
        return {name: HeldOutSet(p.x, p.y, _start_noise(p.y, role), p.mask) for role, (name, p) in enumerate(sets.items())}

    def score(self, answer: Tensor, data: HeldOutSet) -> dict[str, Tensor]:
        cells = data.mask.view(*data.mask.shape[:-1], 81, 9)[..., 0].to(answer.device)
        return grid_scores(decode(answer), decode(data.y).to(answer.device), cells)

    def yardsticks(self, data: HeldOutSet) -> dict[str, dict[str, float]]:
        return sudoku_yardsticks(_problems(data))

    @staticmethod
    def corrupt(y: Tensor, mask: Tensor | None, fraction: float, uniform: Tensor) -> Tensor:
        return corrupt_grid(y, mask, fraction, uniform)


def _start_noise(y: Tensor, role: int) -> Tensor:
    """The sampler's fixed starting noise for a held-out set (a seed of its own per set)."""
    generator = torch.Generator().manual_seed(mix_seed(_NAME_SEED, y.shape[0], role, 3))
    return torch.randn(y.shape, generator=generator)
