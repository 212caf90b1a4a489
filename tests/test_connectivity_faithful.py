"""Connectivity made faithful (issue 24): the larger held-out graphs against a BFS closure, both corruptions'
statistics counted directly, the path aggregations against loops over the middle node, the max's gather
against the materialised n^3 product, the model option through the config."""
from collections import deque

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusion_lib.harness.config import ConfigError, build_config
from diffusion_lib.models import build_model
from diffusion_lib.tasks import connectivity as C
from diffusion_lib.tasks.base import make_task


def bfs_closure(adjacency: np.ndarray) -> np.ndarray:
    """reach[i, j]: j is found by a breadth-first search from i (i reaches itself)."""
    n = len(adjacency)
    reach = np.zeros((n, n), dtype=bool)
    for source in range(n):
        seen, queue = {source}, deque([source])
        while queue:
            node = queue.popleft()
            for nxt in np.flatnonzero(adjacency[node]):
                if nxt not in seen:
                    seen.add(int(nxt))
                    queue.append(int(nxt))
        reach[source, sorted(seen)] = True
    return reach


def test_the_larger_held_out_graphs_answer_a_bfs_closure():
    sets = C.held_out_graphs(24, harder=(15, 20))
    for problems in sets.values():
        n = problems.nodes
        for x, y in zip(problems.x.view(-1, n, n).numpy() > 0, problems.y.view(-1, n, n).numpy() > 0):
            assert (bfs_closure(x) == y).all()


# -- corruption ------------------------------------------------------------------------------------------
def corruption_counts(y: torch.Tensor, negative: torch.Tensor, n: int) -> dict[str, float]:
    """Shares of negatives, counted entry by entry in numpy."""
    Y, N = y.view(-1, n, n).numpy(), negative.view(-1, n, n).numpy()
    changed = Y != N
    return {
        "equal": float((~changed.any(axis=(1, 2))).mean()),
        "diagonal": float(changed[:, np.arange(n), np.arange(n)].any(axis=1).mean()),
        "up": float(((Y < 0) & (N > 0)).any(axis=(1, 2)).mean()),  # some -1 made +1
        "down": float(((Y > 0) & (N < 0)).any(axis=(1, 2)).mean()),
        "asymmetric": float((N != N.transpose(0, 2, 1)).any(axis=(1, 2)).mean()),
        "off_diagonal_changed": float(changed[:, ~np.eye(n, dtype=bool)].mean()),
    }


@pytest.fixture(scope="module")
def graphs():
    y = C.sample_graphs(4000, 12, 0.12, torch.Generator().manual_seed(0)).y
    return y, torch.rand(y.shape, generator=torch.Generator().manual_seed(1))


def test_the_published_corruption_hits_the_diagonal_flips_one_way_and_can_leave_the_answer(graphs):
    y, u = graphs
    counts = corruption_counts(y, C.corrupt_reachability(y, 0.05, u, "published"), 12)
    assert counts["up"] == 0.0 and counts["down"] > 0.85
    # a negative hits some of its 12 diagonal (+1) entries with probability 1 - 0.95^12 = 0.46
    assert counts["diagonal"] == pytest.approx(1 - 0.95 ** 12, abs=0.03)
    assert 0.05 < counts["equal"] < 0.15 and counts["asymmetric"] > 0.7


def test_the_clean_corruption_flips_pairs_both_ways_off_the_diagonal_and_always_changes_something(graphs):
    y, u = graphs
    counts = corruption_counts(y, C.corrupt_reachability(y, 0.05, u, "clean"), 12)
    assert counts["equal"] == 0.0 and counts["diagonal"] == 0.0 and counts["asymmetric"] == 0.0
    assert counts["up"] > 0.5 and counts["down"] > 0.5
    # a pair flips with probability 0.05, plus the forced pair of the (0.95^66 = 3.4 %) negatives with none
    assert counts["off_diagonal_changed"] == pytest.approx(0.05 + 0.95 ** 66 / 66, abs=0.004)


def test_a_clean_negative_with_no_pair_drawn_flips_the_pair_with_the_smallest_number():
    y = C.sample_graphs(50, 6, 0.3, torch.Generator().manual_seed(2)).y
    u = torch.rand(y.shape, generator=torch.Generator().manual_seed(3))
    negative = C.corrupt_reachability(y, 0.0, u, "clean").view(-1, 6, 6)
    for b in range(50):
        grid = u[b].view(6, 6)
        i, j = min(((i, j) for i in range(6) for j in range(i + 1, 6)), key=lambda p: grid[p].item())
        expected = y[b].view(6, 6).clone()
        expected[i, j], expected[j, i] = -expected[i, j], -expected[j, i]
        assert torch.equal(negative[b], expected)


def test_the_task_passes_the_kind_and_refuses_an_unknown_one(graphs):
    y, u = graphs
    task = make_task({"dataset": "connectivity"})
    assert torch.equal(task.corrupt(y, None, 0.05, u), C.corrupt_reachability(y, 0.05, u, "published"))
    assert torch.equal(task.corrupt(y, None, 0.05, u, kind="clean"), C.corrupt_reachability(y, 0.05, u, "clean"))
    with pytest.raises(ValueError, match="corruption kind = 'noisy' is unknown; allowed: published, clean"):
        task.corrupt(y, None, 0.05, u, kind="noisy")


# -- aggregation -----------------------------------------------------------------------------------------
def loop_block(block: C.TriangleBlock, h: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """The triangle block written out pair by pair, middle node by middle node (float64)."""
    B, n, _, H = h.shape
    z = F.layer_norm(h, (H,), block.norm.weight, block.norm.bias)
    a, b = block.left(z), block.right(z)
    out = torch.empty_like(h)
    for s in range(B):
        for i in range(n):
            for j in range(n):
                products = [a[s, i, k] * b[s, k, j] for k in range(n)]
                mean = sum(products) / n
                top = products[0]
                for p in products[1:]:
                    top = torch.maximum(top, p)
                paths = {"mean": [mean], "max": [top], "both": [mean, top]}[block.aggregation]
                mixed = block.mix(torch.cat([z[s, i, j], *paths])) * (1 + scale[s, 0, 0]) + shift[s, 0, 0]
                out[s, i, j] = h[s, i, j] + block.out(F.silu(mixed))
    return out


@pytest.mark.parametrize("aggregation", C.AGGREGATIONS)
def test_each_aggregation_equals_a_loop_over_the_middle_node(aggregation):
    torch.manual_seed(0)
    block = C.TriangleBlock(5, aggregation).double()
    h, scale, shift = torch.randn(2, 4, 4, 5).double(), torch.randn(2, 1, 1, 5).double(), torch.randn(2, 1, 1, 5).double()
    with torch.no_grad():
        assert torch.allclose(block(h, scale, shift), loop_block(block, h, scale, shift), atol=1e-12)


def test_the_gathered_max_equals_the_materialised_max_with_its_first_and_second_derivatives():
    torch.manual_seed(1)
    left, right = torch.randn(3, 7, 7, 4, dtype=torch.float64), torch.randn(3, 7, 7, 4, dtype=torch.float64)

    def materialised(a, b):  # every left_ik * right_kj at once [B, i, k, j, H], max over k
        return (a[:, :, :, None] * b[:, None]).amax(dim=2)

    outputs = []
    for f in (C.path_max, materialised):
        a, b = left.clone().requires_grad_(), right.clone().requires_grad_()
        value = f(a, b)
        ga, gb = torch.autograd.grad(value.pow(3).sum(), (a, b), create_graph=True)
        second = torch.autograd.grad((ga.pow(2).sum() + (gb * b).sum()), (a, b))
        outputs.append((value, ga, gb, *second))
    for mine, theirs in zip(*outputs):
        assert torch.allclose(mine, theirs, atol=1e-12)


def test_the_aggregation_is_a_model_option_with_max_by_default():
    assert build_config({"task.dataset": "connectivity"}).model["aggregation"] == "max"
    config = build_config({"task.dataset": "connectivity", "model.aggregation": "both"})
    model = build_model(config.model, make_task(config.task)).ebm
    assert all(block.aggregation == "both" and block.mix.in_features == 3 * model.hidden_dim for block in model.blocks)
    with pytest.raises((ConfigError, ValueError), match="aggregation.*'sum'.*one of max, mean, both"):
        build_config({"task.dataset": "connectivity", "model.aggregation": "sum"})
