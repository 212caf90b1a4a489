"""Sudoku puzzles from seeds: an exact solver that counts solutions, carving, propagation, transforms, caches.

Solution grids: pools filled by randomised backtracking (each fixed by a seed of its own), a drawn grid
then put through a random transformation that keeps validity and uniqueness, batched in torch on the
generator's device: digit relabelling, row permutations within bands, band permutations, the same for
columns and stacks, and a transpose (puzzle and solution together).

Puzzles with one solution are *carved*: cells are blanked in random order only while the puzzle keeps one
solution (`solve` counts, capped at 2), down to a target. Training puzzles come from a pool carved from
`TRAIN_POOL` grids of their own, each drawn puzzle then transformed by the training generator; held-out
sets are carved from transformed grids of the held-out pool; the "hard" set is carved as low as carving
reaches (the sparsest of `HARD_RESTARTS` carvings) and keeps only puzzles that propagation (naked and
hidden singles) cannot finish. Carved pools and sets are cached on disk (`cache_folder`); each file says
what it holds (set, size, givens range, seed, generator version) and is made again when that does not
match or the file is damaged.

Encoding, cell-major (entry = 9 * cell + digit, cell = 9 * row + col, digit 0..8 for 1..9):
  condition x [B, 729]: the givens one-hot in 0/1 (a blank cell is all zeros);
  answer y [B, 729]: the solution one-hot in +-1; mask [B, 729] bool: True on the 9 entries of a given.
"""
from __future__ import annotations

import io
import os
import random
import time
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from diffusion_lib.harness.io import atomic_write_bytes, bar_rate
from diffusion_lib.tasks.base import mix_seed

ID_GIVENS = (30, 45)
HARDER_GIVENS = (17, 28)
POOL_SIZE = 256  # grids of the held-out pool
TRAIN_POOL = 2048  # carved training puzzles, each from a grid of its own (before transforms)
HARD_RESTARTS = 3  # carvings per hard puzzle; the sparsest is kept
PROGRESS_AFTER_S = 2.0  # carving that lasts longer shows a progress bar (a large set takes hours)
PROBE_PUZZLES = 4  # puzzles of each set carved to estimate the set's cost (--dry-run)
# the version of the generated data: bump it when a change to the generator or solver changes the sets
DATA_VERSION = 1
NAME_SEED = zlib.crc32(b"sudoku")
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


def _grid_pool(size: int, salt: int) -> Iterator[list[int]]:
    """`size` random solution grids (randomised backtracking fills, digits 1..9) from a seed fixed by `salt`."""
    # the fills follow `solve`'s search order: a change to the solver changes every generated set
    rng = random.Random(mix_seed(NAME_SEED, size, 1, salt))
    return (solve([0] * 81, cap=1, rng=rng)[1] for _ in range(size))


def _progress(items: Iterable, total: int, what: str) -> tqdm:
    """`items`, counted on stderr by a bar that shows once carving has lasted PROGRESS_AFTER_S (to be used in
    a `with`: a stop closes the bar before the command says why)."""
    return tqdm(items, total=total, desc=f"carving {what}", unit=" puzzles", delay=PROGRESS_AFTER_S, **bar_rate())


@lru_cache(maxsize=4)
def solution_pool(size: int = POOL_SIZE, held_out: bool = False) -> Tensor:
    """`size` random solution grids, digits 0..8 [size, 81], from a fixed seed.

    Training and the held-out sets draw from different pools, so no held-out solution is a transform
    of a grid seen in training (short of a chance coincidence).
    """
    return torch.tensor(list(_grid_pool(size, int(held_out))), dtype=torch.long) - 1


# -- transforms ------------------------------------------------------------------------------------------
def _line_permutation(batch: int, generator: torch.Generator) -> Tensor:
    """[B, 9] row (or column) orders that keep the bands: a random band order, a random order within each."""
    device = generator.device
    bands = torch.rand((batch, 3), generator=generator, device=device).argsort(dim=-1)
    within = torch.rand((batch, 3, 3), generator=generator, device=device).argsort(dim=-1)
    return (bands.unsqueeze(-1) * 3 + within).flatten(1)


def random_transform(digits: Tensor, givens: Tensor | None, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
    """Grids [B, 81] (0..8) and their given cells [B, 81] under one random transform each: a transpose,
    line permutations within bands and stacks, band and stack permutations, a digit relabelling."""
    batch, device = digits.shape[0], generator.device
    cells = torch.arange(81, device=device).expand(batch, 81).view(batch, 9, 9)
    flip = torch.rand((batch, 1, 1), generator=generator, device=device) < 0.5
    cells = torch.where(flip, cells.transpose(1, 2), cells)
    rows = _line_permutation(batch, generator)
    cols = _line_permutation(batch, generator)
    cells = cells.gather(1, rows.unsqueeze(-1).expand(-1, -1, 9)).gather(2, cols.unsqueeze(1).expand(-1, 9, -1)).flatten(1)
    relabel = torch.rand((batch, 9), generator=generator, device=device).argsort(dim=-1)
    moved = relabel.gather(1, digits.gather(1, cells))
    return moved, None if givens is None else givens.gather(1, cells)


def random_solutions(batch: int, generator: torch.Generator, pool: Tensor | None = None) -> Tensor:
    """[B, 81] solution digits 0..8: pool grids under random transforms (`random_transform`)."""
    device = generator.device
    pool = (solution_pool() if pool is None else pool).to(device)
    pick = torch.randint(pool.shape[0], (batch,), generator=generator, device=device)
    return random_transform(pool[pick], None, generator)[0]


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
    """A batch of puzzles at random cells (several solutions possible) on the generator's device."""
    return encode(random_solutions(batch, generator, pool), random_givens(batch, givens, generator))


def set_seed(givens: tuple[int, int]) -> int:
    return mix_seed(NAME_SEED, givens[0], givens[1])


# -- carving ---------------------------------------------------------------------------------------------
def carve_unique(solution: list[int], target: int, rng: random.Random) -> list[bool]:
    """Given cells [81]: blank cells in random order, each only if one solution remains, down to `target`.

    Stops above `target` when no further cell can go (a minimal puzzle): sparse targets are then missed.
    Costs an exact solve per tried cell whose peers do not force it, milliseconds a puzzle.
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


def _carving_rng(generator: torch.Generator) -> random.Random:
    return random.Random(int(torch.randint(2**62, (1,), generator=generator, device=generator.device)))


def unique_puzzles(batch: int, givens: tuple[int, int], generator: torch.Generator,
                   pool: Tensor | None = None) -> SudokuProblems:
    """Like `sample_puzzles` but every puzzle has one solution: givens carved by `carve_unique` (CPU)."""
    solutions = random_solutions(batch, generator, pool).cpu()
    targets = torch.randint(givens[0], givens[1] + 1, (batch,), generator=generator, device=generator.device)
    rng = _carving_rng(generator)
    what = f"{batch} puzzles, givens {givens[0]}-{givens[1]}"
    with _progress(zip(solutions.tolist(), targets.tolist()), batch, what) as carving:
        masks = [carve_unique(solution, target, rng) for solution, target in carving]
    return encode(solutions, torch.tensor(masks, dtype=torch.bool))


def sparsest_carving(solution: list[int], restarts: int, rng: random.Random) -> list[bool]:
    """The carving with the fewest givens among `restarts` carvings to a minimal puzzle."""
    return min((carve_unique(solution, 0, rng) for _ in range(restarts)), key=sum)


def hard_puzzles(batch: int, generator: torch.Generator, pool: Tensor | None = None,
                 restarts: int = HARD_RESTARTS) -> SudokuProblems:
    """`batch` puzzles carved as low as carving reaches (`sparsest_carving`) that propagation cannot finish:
    candidates are carved in rounds of `batch` from transformed grids until enough fail propagation."""
    rng, kept = _carving_rng(generator), []
    with _progress(None, batch, f"{batch} hard puzzles") as bar:
        while len(kept) < batch:
            solutions = random_solutions(batch, generator, pool).cpu()
            masks = torch.tensor([sparsest_carving(s, restarts, rng) for s in solutions.tolist()], dtype=torch.bool)
            candidates = encode(solutions, masks)
            stuck = ~propagation_solves(candidates)
            kept += [(solutions[b], masks[b]) for b in range(batch) if stuck[b]]
            bar.update(min(len(kept), batch) - bar.n)
    solutions, masks = (torch.stack(parts) for parts in zip(*kept[:batch]))
    return encode(solutions, masks)


def _carve_pool(size: int, givens: tuple[int, int], seed: int) -> SudokuProblems:
    """`size` carved puzzles, each from a fresh grid, targets uniform in `givens` (the training pool)."""
    rng, solutions, masks = random.Random(seed), [], []
    with _progress(_grid_pool(size, seed), size, f"{size} training puzzles") as grids:  # grid and carving draw apart
        for grid in grids:
            solutions.append([d - 1 for d in grid])
            masks.append(carve_unique(solutions[-1], rng.randint(*givens), rng))
    return encode(torch.tensor(solutions, dtype=torch.long), torch.tensor(masks, dtype=torch.bool))


def training_seed(size: int, givens: tuple[int, int]) -> int:
    return mix_seed(NAME_SEED, size, givens[0], givens[1], 4)


@lru_cache(maxsize=4)
def training_pool(size: int = TRAIN_POOL, givens: tuple[int, int] = ID_GIVENS) -> SudokuProblems:
    """The training pool of carved puzzles (each with one solution) on the CPU, cached on disk."""
    return _carved("train", size, givens)


def training_puzzles(batch: int, generator: torch.Generator, pool: SudokuProblems) -> SudokuProblems:
    """A batch of training puzzles on the generator's device: pool puzzles under random transforms."""
    device = generator.device
    pick = torch.randint(pool.solutions.shape[0], (batch,), generator=generator, device=device)
    solutions, givens = pool.solutions.to(device)[pick], pool.givens.to(device)[pick]
    return encode(*random_transform(solutions, givens, generator))


# -- the cache -------------------------------------------------------------------------------------------
def cache_folder() -> Path:
    """Where carved pools and sets are kept: $IRED_CACHE, else ~/.cache/ired-diffusion (safe to delete)."""
    return Path(os.environ.get("IRED_CACHE") or Path.home() / ".cache" / "ired-diffusion")


def _cache_path(kind: str, size: int, givens: tuple[int, int], seed: int) -> Path:
    pool = f"_pool{POOL_SIZE}" if kind != "train" else ""
    return cache_folder() / f"sudoku_{kind}_v{DATA_VERSION}_n{size}_givens{givens[0]}-{givens[1]}{pool}_seed{seed}.pt"


def _header(kind: str, size: int, givens: tuple[int, int], seed: int) -> dict:
    """What a cache file holds; a file whose header differs is made again."""
    return {"set": kind, "size": size, "givens": list(givens), "seed": seed, "version": DATA_VERSION}


def _read_cached(path: Path, header: dict) -> SudokuProblems | None:
    """The cached set, or None if the file is missing, unreadable, holds something else or invalid boards."""
    try:
        data = torch.load(path, weights_only=True)
        solutions, givens = data["solutions"], data["givens"]
        shape = (header["size"], 81)
        fits = solutions.shape == givens.shape == shape and (solutions.dtype, givens.dtype) == (torch.long, torch.bool)
        if data["header"] == header and fits and bool(board_valid(solutions).all()):
            return encode(solutions, givens)
    except Exception:  # anything unreadable is made again: the cache only saves time
        pass
    return None


def _write_cached(path: Path, header: dict, problems: SudokuProblems) -> None:
    buffer = io.BytesIO()
    torch.save({"header": header, "solutions": problems.solutions, "givens": problems.givens}, buffer)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError:  # a read-only home: the set is only made again next time
        pass


def _recipe(kind: str, givens: tuple[int, int], size: int) -> tuple[int, Callable[[int], SudokuProblems]]:
    """(seed, carve) of the carved set `kind` ("train", "unique" or "hard"): carve(n) makes its first n puzzles."""
    if kind == "train":
        seed = training_seed(size, givens)
        return seed, lambda n: _carve_pool(n, givens, seed)
    seed = set_seed(givens) if kind == "unique" else mix_seed(NAME_SEED, 5)
    held_out = solution_pool(POOL_SIZE, held_out=True)
    if kind == "unique":
        return seed, lambda n: unique_puzzles(n, givens, torch.Generator().manual_seed(seed), held_out)
    return seed, lambda n: hard_puzzles(n, torch.Generator().manual_seed(seed), held_out)


def _carved(kind: str, size: int, givens: tuple[int, int] = (0, 0)) -> SudokuProblems:
    """The carved set `kind` of `size` puzzles from its cache file, or carved and written there."""
    seed, carve = _recipe(kind, givens, size)
    header, path = _header(kind, size, givens, seed), _cache_path(kind, size, givens, seed)
    problems = _read_cached(path, header)
    if problems is None:
        problems = carve(size)
        _write_cached(path, header, problems)
    return problems


def carving_seconds(sets: list[tuple[str, int, tuple[int, int]]]) -> float:
    """Seconds to carve those of `sets` ((kind, size, givens) as `_carved` takes them) not in the cache,
    extrapolated from the time PROBE_PUZZLES of each take here."""
    total = 0.0
    for kind, size, givens in sets:
        seed, carve = _recipe(kind, givens, size)
        if not _cache_path(kind, size, givens, seed).exists():
            started = time.perf_counter()
            carve(PROBE_PUZZLES)
            total += (time.perf_counter() - started) * size / PROBE_PUZZLES
    return total


# -- held-out sets ---------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _held_out_one(num_samples: int, givens: tuple[int, int], unique: bool) -> SudokuProblems:
    if unique:
        return _carved("unique", num_samples, givens)
    generator = torch.Generator().manual_seed(set_seed(givens))
    return sample_puzzles(num_samples, givens, generator, solution_pool(POOL_SIZE, held_out=True))


@lru_cache(maxsize=4)
def hard_set(num_samples: int) -> SudokuProblems:
    """The held-out "hard" set: minimal carvings that propagation cannot finish (cached)."""
    return _carved("hard", num_samples)


def held_out_puzzles(num_samples: int, givens: tuple[int, int] = ID_GIVENS, harder: tuple[int, int] = HARDER_GIVENS,
                     unique: bool = False) -> dict[str, SudokuProblems]:
    """The fixed held-out sets on the CPU: "id", the harder "ood" (fewer givens) and, when `unique`, "hard".

    unique=True carves the givens so that every puzzle has one solution (slower; sparse targets may be
    missed: see `carve_unique`).
    """
    sets = {"id": _held_out_one(num_samples, tuple(givens), unique), "ood": _held_out_one(num_samples, tuple(harder), unique)}
    return {**sets, "hard": hard_set(num_samples)} if unique else sets


def puzzle_grid(problems: SudokuProblems, index: int) -> list[int]:
    """One puzzle as the solver's digits 1..9, 0 = blank."""
    digits = (problems.solutions[index] + 1) * problems.givens[index]
    return [int(d) for d in digits]


def unique_fraction(problems: SudokuProblems) -> float:
    """The share of puzzles whose solution is unique (exact solver, count capped at 2)."""
    counts = [solve(puzzle_grid(problems, i))[0] for i in range(problems.x.shape[0])]
    return sum(c == 1 for c in counts) / len(counts)


# -- checking and propagation ----------------------------------------------------------------------------
def board_valid(digits: Tensor) -> Tensor:
    """bool [...]: every row, column and box of digits [..., 81] (0..8) holds each digit once."""
    onehot = F.one_hot(digits, 9)
    per_unit = onehot[..., UNITS.to(digits.device), :].sum(dim=-2)  # [..., 27, 9]
    return (per_unit == 1).all(dim=-1).all(dim=-1)


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



def propagation_solves(problems: SudokuProblems) -> Tensor:
    """bool [B]: propagation alone fills every cell with the solution's digit."""
    return (propagate(problems) == problems.solutions).all(dim=-1)
