"""Connectivity and Sudoku: generated data checked by independent, straightforward computations."""
from collections import deque

import numpy as np
import pytest
import torch

from diffusion_lib.tasks import connectivity as C
from diffusion_lib.tasks import sudoku as S
from diffusion_lib.tasks import sudoku_puzzles as P
from diffusion_lib.models import build_model
from diffusion_lib.tasks.base import make_task


# -- independent checks ----------------------------------------------------------------------------------
def grid_is_valid(digits) -> bool:
    """Every row, column and box of a 9 x 9 grid (digits 0..8, row-major) is the set {0 .. 8}."""
    g = np.asarray(digits).reshape(9, 9)
    units = [g[i] for i in range(9)] + [g[:, i] for i in range(9)]
    units += [g[r:r + 3, c:c + 3].ravel() for r in (0, 3, 6) for c in (0, 3, 6)]
    return all(sorted(u.tolist()) == list(range(9)) for u in units)


def bfs_reach(adjacency: np.ndarray) -> np.ndarray:
    n = adjacency.shape[0]
    reach = np.zeros((n, n), dtype=bool)
    for start in range(n):
        seen, queue = {start}, deque([start])
        while queue:
            node = queue.popleft()
            for other in np.nonzero(adjacency[node])[0]:
                if other not in seen:
                    seen.add(int(other))
                    queue.append(int(other))
        reach[start, list(seen)] = True
    return reach


@pytest.fixture(scope="module")
def puzzles():
    return P.sample_puzzles(64, (17, 45), torch.Generator().manual_seed(3))


# -- Sudoku data -----------------------------------------------------------------------------------------
def test_every_generated_solution_is_a_valid_grid_that_keeps_its_givens(puzzles):
    assert all(grid_is_valid(row) for row in puzzles.solutions.tolist())
    cells_x = puzzles.x.view(-1, 81, 9)
    cells_y = puzzles.y.view(-1, 81, 9)
    for b in range(puzzles.x.shape[0]):
        for cell in range(81):
            digit = int(puzzles.solutions[b, cell])
            assert cells_y[b, cell].tolist() == [1.0 if d == digit else -1.0 for d in range(9)]
            given = bool(puzzles.givens[b, cell])
            assert cells_x[b, cell].tolist() == [1.0 if given and d == digit else 0.0 for d in range(9)]
            assert puzzles.mask[b, cell * 9:(cell + 1) * 9].tolist() == [given] * 9
    counts = puzzles.givens.sum(-1)
    assert counts.min() >= 17 and counts.max() <= 45


def test_held_out_sudoku_sets_are_fixed_by_seed_and_in_their_ranges():
    torch.manual_seed(0)
    first = P.held_out_puzzles(32)
    P._held_out_one.cache_clear(), P.hard_set.cache_clear()
    torch.manual_seed(1)  # the global RNG plays no part
    second = P.held_out_puzzles(32)
    for name in ("id", "ood"):
        assert torch.equal(first[name].x, second[name].x) and torch.equal(first[name].y, second[name].y)
    assert not torch.equal(first["id"].solutions, first["ood"].solutions)
    # the held-out grids come from a pool of their own: the two pools share no grid
    training = {tuple(g) for g in P.solution_pool().tolist()}
    held_out = P.solution_pool(held_out=True).tolist()
    assert len(held_out) == P.POOL_SIZE and not training & {tuple(g) for g in held_out}
    for name, (lo, hi) in (("id", P.ID_GIVENS), ("ood", P.HARDER_GIVENS)):
        counts = first[name].givens.sum(-1)
        assert counts.min() >= lo and counts.max() <= hi


def test_the_exact_solver_agrees_with_generated_solutions(puzzles):
    uniques = 0
    for b in range(puzzles.x.shape[0]):
        grid = P.puzzle_grid(puzzles, b)
        count, first = P.solve(grid)
        assert count in (1, 2)
        assert grid_is_valid([d - 1 for d in first])
        assert all(g == 0 or g == f for g, f in zip(grid, first))  # the givens are kept
        if count == 1:
            uniques += 1
            assert [d - 1 for d in first] == puzzles.solutions[b].tolist()
    assert uniques > 0
    solution = [d + 1 for d in puzzles.solutions[0].tolist()]
    one_blank = solution[:40] + [0] + solution[41:]
    assert P.solve(one_blank) == (1, solution)
    assert P.solve([0] * 81)[0] == 2  # the empty grid: many solutions, the count stops at the cap
    clash = [0] * 81
    clash[0] = clash[1] = 5
    assert P.solve(clash) == (0, None)


def test_unique_fraction_counts_the_puzzles_with_one_solution(puzzles):
    small = P.SudokuProblems(*(v[:8] for v in (puzzles.x, puzzles.y, puzzles.mask, puzzles.solutions, puzzles.givens)))
    expected = sum(P.solve(P.puzzle_grid(small, b))[0] == 1 for b in range(8)) / 8
    assert P.unique_fraction(small) == expected


def test_carved_puzzles_have_one_solution_and_keep_their_givens():
    problems = P.unique_puzzles(6, (17, 30), torch.Generator().manual_seed(4))
    counts = problems.givens.sum(-1)
    assert counts.min() >= 17 and counts.max() <= 30
    for b in range(6):
        count, first = P.solve(P.puzzle_grid(problems, b))
        assert count == 1 and [d - 1 for d in first] == problems.solutions[b].tolist()
        assert grid_is_valid(problems.solutions[b].tolist())
    assert P.unique_fraction(problems) == 1.0


def test_sudoku_corruption_redraws_the_stated_fraction_of_blank_cells(puzzles):
    y = puzzles.y.repeat(20, 1)
    mask = puzzles.mask.repeat(20, 1)
    fraction = 0.2
    out = S.corrupt_grid(y, mask, fraction, torch.rand(y.shape, generator=torch.Generator().manual_seed(5)))
    cells_in, cells_out = y.view(-1, 81, 9), out.view(-1, 81, 9)
    assert ((cells_out == 1).sum(-1) == 1).all()  # still one digit per cell, in +-1
    changed = (cells_in != cells_out).any(-1)
    givens = mask.view(-1, 81, 9)[..., 0]
    assert not changed[givens].any()
    # a re-draw keeps the old digit with probability 1/9
    rate = changed[~givens].float().mean().item()
    assert abs(rate - fraction * 8 / 9) < 0.01


# -- Sudoku metrics and yardsticks -----------------------------------------------------------------------
def one_hot_pm1(digits: torch.Tensor) -> torch.Tensor:
    return (torch.nn.functional.one_hot(digits, 9).float() * 2 - 1).flatten(-2)


def test_sudoku_metrics_on_hand_made_answers(puzzles):
    problems = P.SudokuProblems(*(v[:1] for v in (puzzles.x, puzzles.y, puzzles.mask, puzzles.solutions, puzzles.givens)))
    solution = problems.solutions[0]
    blanks = (~problems.givens[0]).nonzero().flatten()
    blank_count = len(blanks)
    # the solution itself, as a noisy +-1 answer (argmax decoding)
    scores = S.sudoku_scores(problems.y * 0.3 + 0.01, problems)
    assert scores["board_accuracy"].tolist() == [1.0] and scores["blank_accuracy"].tolist() == [1.0]
    # two blank cells of one row swapped: the columns break, two blanks wrong
    row = int(blanks[0]) // 9
    pair = [int(c) for c in blanks if int(c) // 9 == row][:2]
    if len(pair) == 2:
        swapped = solution.clone()
        swapped[pair[0]], swapped[pair[1]] = solution[pair[1]], solution[pair[0]]
        scores = S.sudoku_scores(one_hot_pm1(swapped).unsqueeze(0), problems)
        assert scores["board_accuracy"].item() == 0.0
        assert scores["blank_accuracy"].item() == pytest.approx((blank_count - 2) / blank_count)
    # a valid grid that drops the givens: digits relabelled 0 <-> 1 everywhere
    relabelled = torch.tensor([{0: 1, 1: 0}.get(int(d), int(d)) for d in solution])
    assert grid_is_valid(relabelled.tolist())
    kept = all(solution[c] == relabelled[c] for c in range(81) if problems.givens[0, c])
    scores = S.grid_scores(relabelled.unsqueeze(0), problems.solutions, problems.givens)
    assert scores["board_accuracy"].item() == float(kept)
    expected_blank = sum(int(relabelled[c] == solution[c]) for c in blanks) / blank_count
    assert scores["blank_accuracy"].item() == pytest.approx(expected_blank)


def test_sudoku_yardsticks_on_a_tiny_set_by_hand(puzzles):
    solutions = puzzles.solutions[:3]
    givens = torch.ones(3, 81, dtype=torch.bool)
    givens[0, 10] = False  # one blank: a naked single
    givens[1] = False  # nothing given: propagation decides nothing
    givens[1, 0] = True
    # puzzle 2: one row blank except its first cell: every blank there is a naked single
    givens[2, 9:18] = False
    givens[2, 9] = True
    problems = P.encode(solutions, givens)
    marks = S.sudoku_yardsticks(problems)
    assert marks["propagation"]["board_accuracy"] == pytest.approx(2 / 3)
    assert marks["propagation"]["blank_accuracy"] == pytest.approx((1 + 0 + 1) / 3)
    assert marks["solver"]["board_accuracy"] == 1.0
    # the solver's fill is the generated one where the puzzle is unique (puzzles 0 and 2)
    assert marks["solver"]["blank_accuracy"] >= 2 / 3
    assert marks["random_fill"]["board_accuracy"] < 1.0
    fill = S.random_fill(problems)
    expected = np.mean([(fill[b][~givens[b]] == solutions[b][~givens[b]]).float().mean().item() for b in range(3)])
    assert marks["random_fill"]["blank_accuracy"] == pytest.approx(expected)


def singles_by_hand(grid: list[int]) -> list[int]:
    """Naked and hidden singles to a fixed point, one placement at a time (digits 1..9, 0 = blank)."""
    grid = list(grid)
    units = [[9 * r + c for c in range(9)] for r in range(9)] + [[9 * r + c for r in range(9)] for c in range(9)]
    units += [[9 * (br + r) + bc + c for r in range(3) for c in range(3)] for br in (0, 3, 6) for bc in (0, 3, 6)]
    def candidates(cell):
        peers = {p for u in units if cell in u for p in u}
        return {d for d in range(1, 10)} - {grid[p] for p in peers}
    progress = True
    while progress:
        progress = False
        for cell in range(81):
            if grid[cell] == 0 and len(candidates(cell)) == 1:
                grid[cell], progress = candidates(cell).pop(), True
        for unit in units:
            for digit in set(range(1, 10)) - {grid[c] for c in unit}:
                spots = [c for c in unit if grid[c] == 0 and digit in candidates(c)]
                if len(spots) == 1:
                    grid[spots[0]], progress = digit, True
    return grid


def test_propagation_places_what_naked_and_hidden_singles_place_by_hand():
    problems = P.sample_puzzles(12, (24, 36), torch.Generator().manual_seed(11))
    digits = P.propagate(problems)
    for b in range(12):
        assert [int(d) + 1 for d in digits[b]] == singles_by_hand(P.puzzle_grid(problems, b))


def test_a_latin_square_that_breaks_the_boxes_is_no_board():
    latin = torch.tensor([(r + c) % 9 for r in range(9) for c in range(9)]).unsqueeze(0)
    assert not grid_is_valid(latin[0].tolist())
    assert not P.board_valid(latin).item()
    scores = S.grid_scores(latin, latin, torch.zeros(1, 81, dtype=torch.bool))
    assert scores["board_accuracy"].item() == 0.0 and scores["blank_accuracy"].item() == 1.0


def test_propagation_matches_the_generated_solution_wherever_it_decides():
    problems = P.sample_puzzles(64, (25, 40), torch.Generator().manual_seed(9))
    digits = P.propagate(problems)
    decided = digits >= 0
    for b in range(64):
        grid = [int(d) + 1 if d >= 0 else 0 for d in digits[b]]
        assert P.solve(grid, cap=1)[0] == 1  # what propagation placed still has a completion
        count, _ = P.solve(P.puzzle_grid(problems, b))
        if count == 1:
            assert torch.equal(digits[b][decided[b]], problems.solutions[b][decided[b]])
    assert decided.float().mean() > (problems.givens.float().mean() + 0.1)  # it places more than the givens


# -- connectivity ----------------------------------------------------------------------------------------
def test_connectivity_answers_equal_an_independent_transitive_closure():
    for nodes in (5, 12, 20):
        problems = C.sample_graphs(40, nodes, 0.15, torch.Generator().manual_seed(nodes))
        adjacency = (problems.x.view(-1, nodes, nodes) > 0).numpy()
        assert (adjacency == adjacency.transpose(0, 2, 1)).all() and not adjacency[:, range(nodes), range(nodes)].any()
        for b in range(40):
            expected = bfs_reach(adjacency[b])
            assert ((problems.y[b].view(nodes, nodes) > 0).numpy() == expected).all()
    dense = C.sample_graphs(2000, 10, 0.3, torch.Generator().manual_seed(0))
    rows, cols = torch.triu_indices(10, 10, 1)
    edges = (dense.x.view(-1, 10, 10) > 0)[:, rows, cols]
    assert abs(edges.float().mean().item() - 0.3) < 0.01


def test_held_out_graph_sets_are_fixed_by_seed():
    torch.manual_seed(0)
    first = C.held_out_graphs(16)
    C._held_out_one.cache_clear()
    torch.manual_seed(1)
    second = C.held_out_graphs(16)
    assert list(first) == ["id", "ood15", "ood20"]
    for name, nodes in (("id", 12), ("ood15", 15), ("ood20", 20)):
        assert first[name].x.shape == (16, nodes * nodes)
        assert torch.equal(first[name].x, second[name].x) and torch.equal(first[name].y, second[name].y)
    assert not torch.equal(C.held_out_graphs(16, density=0.2)["id"].x, first["id"].x)
    kept = C.held_out_graphs(4000, harder=(20,), keep_degree=True)
    degree = {name: (p.x > 0).float().sum(-1).mean().item() / p.nodes for name, p in kept.items()}
    assert degree["ood20"] == pytest.approx(degree["id"], rel=0.03)
    assert degree["id"] == pytest.approx(C.DENSITY * 11, rel=0.03)


def test_connectivity_corruption_sets_the_stated_fraction_to_minus_one_only():
    y = C.sample_graphs(2000, 12, 0.12, torch.Generator().manual_seed(1)).y
    out = C.corrupt_reachability(y, 0.1, torch.rand(y.shape, generator=torch.Generator().manual_seed(2)))
    assert torch.equal(out[y < 0], y[y < 0])  # one-way: an unreachable pair is never made reachable
    flipped = (out != y)[y > 0].float().mean().item()
    assert abs(flipped - 0.1) < 0.005


def test_connectivity_metrics_and_yardsticks_on_a_hand_made_set():
    # graph 0: edge 0-1, node 2 alone; graph 1: path 0-1-2
    adjacency = torch.tensor([[[0, 1, 0], [1, 0, 0], [0, 0, 0]], [[0, 1, 0], [1, 0, 1], [0, 1, 0]]], dtype=torch.bool)
    problems = C.GraphProblems(C.to_pm1(adjacency), C.to_pm1(C.reachability(adjacency)), 3)
    assert problems.y[0].tolist() == [1, 1, -1, 1, 1, -1, -1, -1, 1]
    assert (problems.y[1] == 1).all()
    scores = C.connectivity_scores(problems.y * 0.5, problems.y)
    assert scores["entry_accuracy"].tolist() == [1.0, 1.0] and scores["graph_accuracy"].tolist() == [1.0, 1.0]
    wrong = problems.y.clone()
    wrong[0, 2] = 1
    scores = C.connectivity_scores(wrong, problems.y)
    assert scores["entry_accuracy"].tolist() == pytest.approx([8 / 9, 1.0]) and scores["graph_accuracy"].tolist() == [0.0, 1.0]
    marks = C.connectivity_yardsticks(problems)
    # adjacency literally: graph 0 misses its 3 diagonal entries, graph 1 its 3 diagonal and the 0-2 pair twice
    assert marks["adjacent"]["entry_accuracy"] == pytest.approx((6 / 9 + 4 / 9) / 2)
    assert marks["adjacent"]["graph_accuracy"] == 0.0
    assert marks["all_connected"]["entry_accuracy"] == pytest.approx((5 / 9 + 1) / 2)
    assert marks["all_connected"]["graph_accuracy"] == 0.5
    assert marks["within_1_hops"]["entry_accuracy"] == pytest.approx((1 + 7 / 9) / 2)
    assert marks["within_2_hops"]["graph_accuracy"] == 1.0
    label = C.majority_label(12, C.DENSITY)
    majority = marks["majority"]["entry_accuracy"]
    assert majority == pytest.approx(marks["all_connected"]["entry_accuracy"] if label else (7 / 9 + 3 / 9) / 2)


# -- energy models ---------------------------------------------------------------------------------------
def assert_trains_through_its_gradient(model, cond, y):
    """The denoiser is grad_y E, and the score loss is differentiated through it: both must be finite."""
    y = y.clone().requires_grad_()
    grad, = torch.autograd.grad(model.energy(cond, y).sum(), y, create_graph=True)
    assert grad.shape == y.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0
    grad.pow(2).mean().backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    assert grads["embed_y.parametrizations.weight.original"].abs().sum() > 0


@pytest.mark.parametrize("nodes", [12, 20])
def test_the_graph_model_runs_unchanged_at_any_node_count(nodes):
    torch.manual_seed(0)
    # built for 12-node graphs (the task's training size), run at `nodes`
    model = build_model({"name": "graph", "hidden_dim": 16, "layers": 2, "time_dim": 16}, make_task({"dataset": "connectivity"})).ebm
    problems = C.sample_graphs(5, nodes, 0.12, torch.Generator().manual_seed(0))
    x, y = problems.x.unsqueeze(0), problems.y.unsqueeze(0)
    cond = model.condition(x, torch.randint(10, (1, 5)), 10)
    energy = model.energy(cond, y)
    assert energy.shape == (1, 5, 1) and torch.isfinite(energy).all()
    stacked = torch.stack([y, -y, 0.3 * y], dim=1)  # [P, k, B, D]
    energies = model.energy(cond.broadcast_to(stacked), stacked)
    assert energies.shape == (1, 3, 5, 1)
    assert torch.allclose(energies[:, 0], energy, rtol=1e-5) and torch.allclose(energies[:, 1], model.energy(cond, -y), rtol=1e-5)
    assert_trains_through_its_gradient(model, cond, y)


def test_the_sudoku_model_gives_one_finite_energy_per_answer(puzzles):
    torch.manual_seed(0)
    model = build_model({"name": "sudoku_net", "hidden_dim": 16, "layers": 2, "time_dim": 16}, make_task({"dataset": "sudoku"})).ebm
    x, y = puzzles.x[:4].unsqueeze(0), puzzles.y[:4].unsqueeze(0)
    cond = model.condition(x, torch.randint(10, (1, 4)), 10)
    energy = model.energy(cond, y)
    assert energy.shape == (1, 4, 1) and torch.isfinite(energy).all()
    pair = torch.stack([y, torch.zeros_like(y)], dim=1)
    energies = model.energy(cond.broadcast_to(pair), pair)
    assert energies.shape == (1, 2, 4, 1) and torch.allclose(energies[:, 0], energy, rtol=1e-5)
    assert_trains_through_its_gradient(model, cond, y)
    with pytest.raises(ValueError, match="model 'sudoku_net' trains one run at a time"):
        build_model({"name": "sudoku_net"}, make_task({"dataset": "sudoku"}), runs=2)
    with pytest.raises(ValueError, match="model 'sudoku_net' needs 9 x 9 x 9"):
        build_model({"name": "sudoku_net"}, make_task({"dataset": "inverse", "rank": 3}))
