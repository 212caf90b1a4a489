"""Sudoku as the published runs train it, checked against independent computations: training puzzles with one
solution (a brute-force count), the hard set, given entries out of the denoising loss (worked by hand), the two
corruptions (counted directly), the reference step schedule on discrete tasks, and the propagation-split scores."""
import math

import pytest
import torch

from diffusion_lib.diffusion import GaussianDiffusion1D
from diffusion_lib.models import build_model
from diffusion_lib.mining import resolve_mining_config
from diffusion_lib.tasks import sudoku as S
from diffusion_lib.tasks import sudoku_puzzles as P
from diffusion_lib.tasks.base import make_task

UNITS = ([[9 * r + c for c in range(9)] for r in range(9)] + [[9 * r + c for r in range(9)] for c in range(9)]
         + [[9 * (br + r) + bc + c for r in range(3) for c in range(3)] for br in (0, 3, 6) for bc in (0, 3, 6)])
PEERS = [sorted({p for u in UNITS if cell in u for p in u} - {cell}) for cell in range(81)]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IRED_CACHE", str(tmp_path / "cache"))
    P._held_out_one.cache_clear(), P.hard_set.cache_clear(), P.training_pool.cache_clear()
    yield
    P._held_out_one.cache_clear(), P.hard_set.cache_clear(), P.training_pool.cache_clear()


# -- independent helpers -----------------------------------------------------------------------------------
def count_solutions(grid: list[int], cap: int = 2) -> int:
    """Plain backtracking over sets of candidates (digits 1..9, 0 = blank), the most constrained blank first."""
    blanks = [c for c in range(81) if grid[c] == 0]
    if not blanks:
        return 1
    options = {c: set(range(1, 10)) - {grid[p] for p in PEERS[c]} for c in blanks}
    cell = min(blanks, key=lambda c: len(options[c]))
    total = 0
    for digit in options[cell]:
        grid[cell] = digit
        total += count_solutions(grid, cap - total)
        grid[cell] = 0
        if total >= cap:
            break
    return total


def is_board(digits: list[int]) -> bool:
    return all(sorted(digits[c] for c in unit) == list(range(9)) for unit in UNITS)


def singles(grid: list[int]) -> list[int]:
    """Naked and hidden singles to a fixed point (digits 1..9, 0 = blank)."""
    grid, progress = list(grid), True
    while progress:
        progress = False
        free = {c: set(range(1, 10)) - {grid[p] for p in PEERS[c]} for c in range(81) if grid[c] == 0}
        for cell, digits in free.items():
            if len(digits) == 1:
                grid[cell], progress = digits.pop(), True
                break
        else:
            for unit in UNITS:
                for digit in set(range(1, 10)) - {grid[c] for c in unit}:
                    spots = [c for c in unit if c in free and digit in free[c]]
                    if len(spots) == 1:
                        grid[spots[0]], progress = digit, True
                        break
                if progress:
                    break
    return grid


def puzzles_of(batch) -> list[tuple[list[int], list[int]]]:
    """(puzzle digits 1..9 with 0 = blank, solution digits 0..8) of each problem of a Batch."""
    cells_x, cells_y = batch.x.view(-1, 81, 9), batch.y.view(-1, 81, 9)
    solutions = cells_y.argmax(-1).tolist()
    puzzles = [[(d + 1) if given else 0 for d, given in zip(sol, row)] for sol, row in
               zip(solutions, (cells_x.sum(-1) > 0).tolist())]
    return list(zip(puzzles, solutions))


# -- training puzzles --------------------------------------------------------------------------------------
def test_every_sampled_training_puzzle_has_exactly_one_solution_and_a_seed_fixes_the_batch():
    task = make_task({"dataset": "sudoku", "train_pool": 64})
    batch = task.sample(120, torch.Generator().manual_seed(7))
    again = task.sample(120, torch.Generator().manual_seed(7))
    other = task.sample(120, torch.Generator().manual_seed(8))
    assert torch.equal(batch.x, again.x) and torch.equal(batch.y, again.y) and not torch.equal(batch.y, other.y)
    seen = set()
    for puzzle, solution in puzzles_of(batch):
        assert is_board(solution) and 30 <= sum(d > 0 for d in puzzle) <= 45
        assert all(d == 0 or d == s + 1 for d, s in zip(puzzle, solution))
        assert count_solutions(list(puzzle)) == 1
        seen.add(tuple(solution))
    # 120 draws from 64 pool puzzles: transforms make (almost) every one a grid of its own
    assert len(seen) >= 115
    assert torch.equal(batch.mask.view(-1, 81, 9)[..., 0], batch.x.view(-1, 81, 9).sum(-1) > 0)


def test_the_training_pool_is_cached_with_what_it_holds_and_remade_when_that_differs(tmp_path):
    pool = P.training_pool(16, (30, 45))
    path = next((tmp_path / "cache").glob("sudoku_train_*.pt"))
    header = torch.load(path, weights_only=True)["header"]
    assert header == {"set": "train", "size": 16, "givens": [30, 45], "seed": P.training_seed(16, (30, 45)),
                      "version": P.DATA_VERSION}
    stale = torch.load(path, weights_only=True)
    torch.save({**stale, "header": {**header, "givens": [20, 25]}}, path)
    P.training_pool.cache_clear()
    assert torch.equal(P.training_pool(16, (30, 45)).givens, pool.givens)  # remade from the seed
    assert torch.load(path, weights_only=True)["header"] == header


def test_the_hard_set_is_unique_minimal_carvings_that_singles_cannot_finish():
    hard = make_task({"dataset": "sudoku"}).held_out(6)["hard"]
    for puzzle, solution in puzzles_of(hard):
        assert count_solutions(list(puzzle)) == 1 and is_board(solution)
        assert 0 in singles(puzzle)
        # minimal: no given can go without a second solution appearing
        for cell in [c for c in range(81) if puzzle[c]][:5]:
            fewer = list(puzzle)
            fewer[cell] = 0
            assert count_solutions(fewer) == 2


# -- the denoising loss ------------------------------------------------------------------------------------
def test_given_entries_add_nothing_to_the_denoising_loss_worked_by_hand():
    task = make_task({"dataset": "sudoku", "unique": False})
    model = build_model({"name": "sudoku_net", "hidden_dim": 8, "layers": 1, "time_dim": 8}, task).double()
    diffusion = GaussianDiffusion1D(model, mining_config=resolve_mining_config({"strategy": "none"}), data_bound=1.0).double()
    x, y, mask = task.sample(5, torch.Generator().manual_seed(2))
    x, y = x.double(), y.double()
    draws = diffusion.draw(5, [torch.Generator().manual_seed(3)], "cpu")
    draws.noise = draws.noise.double()
    # a stand-in denoiser whose prediction is 0.3 y_t + 7 on given entries (far off) and 0.3 y_t elsewhere
    model.energy_and_grad = lambda cond, y_t, need_grad=True: (y_t.sum(-1, keepdim=True), 0.3 * y_t + 7.0 * mask)
    _, stats = diffusion(x, y, draws=draws, mask=mask)
    signal = diffusion.sqrt_alphas_cumprod[draws.t[0]].tolist()
    spread = diffusion.sqrt_one_minus_alphas_cumprod[draws.t[0]].tolist()
    total = 0.0
    for b in range(5):
        for j in range(729):
            if mask[b, j]:
                continue  # given: the prediction is the target, (eps - eps)^2 = 0
            eps = float(draws.noise[0, b, j])
            y_t = signal[b] * float(y[b, j]) + spread[b] * eps
            total += (0.3 * y_t - eps) ** 2
    by_hand = total / (5 * 729)  # the mean still over every entry
    assert math.isclose(float(stats["loss_denoise"][0]), by_hand, rel_tol=1e-9)


# -- corruption --------------------------------------------------------------------------------------------
def corruption_counts(kind: str, fraction: float = 0.05, n: int = 4000):
    problems = P.sample_puzzles(n, (30, 45), torch.Generator().manual_seed(1))
    uniform = torch.rand(problems.y.shape, generator=torch.Generator().manual_seed(2))
    out = S.corrupt_grid(problems.y, problems.mask, fraction, uniform, kind=kind)
    before, after = problems.y.view(n, 81, 9).argmax(-1), out.view(n, 81, 9)
    assert ((after == 1).sum(-1) == 1).all() and ((after == 1) | (after == -1)).all()
    changed = before != after.argmax(-1)
    blank = ~problems.givens
    return changed, blank


def test_published_corruption_leaves_some_negatives_equal_to_the_positive():
    changed, blank = corruption_counts("published")
    assert not changed[~blank].any()
    equal = (~changed.any(-1)).float().mean().item()
    # each blank is hit with p = 0.05 and re-drawn to another digit 8 times in 9
    expected = ((1 - 0.05 * 8 / 9) ** blank.sum(-1).double()).mean().item()
    assert abs(equal - expected) < 0.015 and equal > 0.05
    assert abs(changed[blank].float().mean().item() - 0.05 * 8 / 9) < 0.002


def test_clean_corruption_changes_every_hit_and_every_negative():
    changed, blank = corruption_counts("clean")
    assert not changed[~blank].any()
    assert changed.any(-1).all()  # no negative equals its positive
    # a blank changes with p = 0.05, or as the puzzle's forced cell when nothing else was hit
    nothing = (1 - 0.05) ** blank.sum(-1).double()
    expected = ((0.05 * blank.sum(-1) + nothing) / blank.sum(-1)).mean().item()
    per_puzzle = (changed.sum(-1) / blank.sum(-1)).double().mean().item()
    assert abs(per_puzzle - expected) < 0.003


def test_mining_corruption_reaches_the_task_and_an_unknown_kind_is_refused():
    task = make_task({"dataset": "sudoku", "unique": False})
    model = build_model({"name": "sudoku_net", "hidden_dim": 8, "layers": 1, "time_dim": 8}, task)
    seen = {}

    def spy(y, mask, fraction, uniform, kind="published"):
        seen["kind"] = kind
        return task.corrupt(y, mask, fraction, uniform, kind=kind)

    diffusion = GaussianDiffusion1D(model, mining_config=resolve_mining_config({"strategy": "random", "corruption": "clean"}),
                                    data_bound=1.0, corrupt=spy)
    x, y, mask = task.sample(4, torch.Generator().manual_seed(0))
    diffusion(x, y, generator=torch.Generator().manual_seed(1), mask=mask)
    assert seen == {"kind": "clean"}
    with pytest.raises(ValueError, match="corruption kind = 'dirty'"):
        S.corrupt_grid(y, mask, 0.1, torch.rand(y.shape), kind="dirty")
    with pytest.raises(ValueError, match=r"mining_config\['corruption'\] = 'dirty' is invalid"):
        resolve_mining_config({"strategy": "random", "corruption": "dirty"})


# -- the reference step schedule ---------------------------------------------------------------------------
@pytest.mark.parametrize("bound, factor", [(1.0, 1.0), (2.0, 2.0)])
def test_reference_steps_after_the_first_use_the_clamp_factor(bound, factor):
    task = make_task({"dataset": "sudoku", "unique": False})
    model = build_model({"name": "sudoku_net", "hidden_dim": 8, "layers": 1, "time_dim": 8}, task).double()
    diffusion = GaussianDiffusion1D(model, data_bound=bound).double()
    slope = torch.full((1, 2, 729), 1e-3, dtype=torch.float64)
    # a linear energy: the gradient is `slope` everywhere and every step lowers the energy (all accepted)
    model.energy_and_grad = lambda cond, y, need_grad=True: ((y * slope).sum(-1, keepdim=True), slope.expand_as(y))
    t = torch.tensor([[4, 7]])
    y = torch.zeros(1, 2, 729, dtype=torch.float64)
    out = diffusion.opt_step(None, y, t, steps=3, scale=0.5, schedule="reference").y
    eta = diffusion.opt_step_size.double()[t].unsqueeze(-1)
    torch.testing.assert_close(out, -eta * slope * (0.5 + 2 * factor))


# -- scores split by propagation ---------------------------------------------------------------------------
def test_board_accuracy_split_by_propagation_equals_the_group_means_by_hand():
    task = make_task({"dataset": "sudoku", "unique": False, "givens": [28, 40]})
    data = task.held_out(24)["id"]
    wrong = data.y.view(24, 81, 9).roll(1, dims=-1).view(24, 729)  # every cell's digit moved: no board
    answer = torch.where(torch.arange(24).unsqueeze(-1) % 3 == 0, wrong, data.y)
    right = [i % 3 != 0 for i in range(24)]
    solved = [0 not in singles(puzzle) for puzzle, _ in puzzles_of(data)]
    assert 0 < sum(solved) < 24
    scores = task.score(answer, data)
    for metric, group in (("board_acc_propagation", solved), ("board_acc_search", [not s for s in solved])):
        by_hand = sum(r for r, g in zip(right, group) if g) / sum(group)
        assert math.isclose(scores[metric].sum().item() / 24, by_hand, rel_tol=1e-6)  # the trainer's mean: sum / N
        halves = [task.score(answer[part], data.select(part))[metric].sum().item() for part in (slice(0, 10), slice(10, 24))]
        assert math.isclose(sum(halves) / 24, by_hand, rel_tol=1e-6)  # chunked scoring adds up the same
    marks = task.yardsticks(data)["solver"]
    assert marks["board_acc_propagation"] == marks["board_acc_search"] == 1.0
    assert math.isnan(make_task({"dataset": "sudoku"}).score(data.y, S.SudokuSet(
        data.x, data.y, data.noise, data.mask, S.group_weights(torch.ones(24, dtype=torch.bool))))["board_acc_search"].sum())
