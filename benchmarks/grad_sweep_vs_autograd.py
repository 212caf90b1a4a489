"""Does the MLP's explicit gradient sweep still pay against the EnergyModel default (autograd)?

Run as `python benchmarks/grad_sweep_vs_autograd.py [--steps N] [--quick]` on an otherwise idle machine.

One full training step (data + loss + backward + grad-norm clip 1.0 + Adam), for the strategies none and
adversarial (opt_steps 2), at (rank 20, batch 2048, hidden 512) and (rank 5, batch 256, hidden 256).
`sweep` is the MLP as it trains (`model.grad: sweep`, its own energy_and_grad); `autograd` is the same
model and weights through the base class's autograd path (`model.grad: autograd`). The two run
alternately step by step in one process (the order flipping each step), so load from other work hits
both alike; each reports its median step time, and the ratio is the median of the per-step ratios
autograd / sweep (> 1: the sweep is faster). `--quick`: toy sizes and one step, a smoke check whose
numbers mean nothing.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion_lib.diffusion import GaussianDiffusion1D  # noqa: E402
from diffusion_lib.mining import resolve_mining_config  # noqa: E402
from diffusion_lib.models import build_model  # noqa: E402
from diffusion_lib.tasks.base import make_task  # noqa: E402

SIZES = ((20, 2048, 512), (5, 256, 256))  # (rank, batch, hidden)
QUICK_SIZES = ((2, 16, 16),)
STRATEGIES = ("none", "adversarial")
IMPLS = ("sweep", "autograd")


def make_step(grad: str, strategy: str, rank: int, batch: int, hidden: int) -> Callable[[], None]:
    """One training step of a fresh model (same seed, so the same weights, for either gradient path)."""
    task = make_task({"dataset": "inverse", "rank": rank})
    model = build_model({"name": "mlp", "hidden_dim": hidden, "grad": grad}, task)
    diffusion = GaussianDiffusion1D(model, mining_config=resolve_mining_config({"strategy": strategy, "opt_steps": 2}))
    params = list(diffusion.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-4, betas=(0.9, 0.99))
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        x, y, _ = task.sample(batch, generator)
        loss, _ = diffusion(x, y, generator=generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_pair(steps: dict[str, Callable[[], None]], count: int, warmup: int) -> dict[str, list[float]]:
    for _ in range(warmup):
        for impl in IMPLS:
            steps[impl]()
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for i in range(count):
        for impl in IMPLS if i % 2 == 0 else reversed(IMPLS):
            start = time.perf_counter()
            steps[impl]()
            times[impl].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per implementation and setup")
    parser.add_argument("--quick", action="store_true", help="toy sizes, one step: a smoke check")
    args = parser.parse_args(argv)
    count, warmup = (1, 0) if args.quick else (args.steps, 3)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {count} alternating steps, medians")
    print(f"{'rank':>4} {'batch':>5} {'hidden':>6} {'strategy':<12} {'sweep s':>9} {'autograd s':>10} {'autograd/sweep':>14}")
    for rank, batch, hidden in QUICK_SIZES if args.quick else SIZES:
        for strategy in STRATEGIES:
            steps = {impl: make_step(impl, strategy, rank, batch, hidden) for impl in IMPLS}
            times = time_pair(steps, count, warmup)
            ratio = statistics.median(a / s for a, s in zip(times["autograd"], times["sweep"]))
            print(f"{rank:>4} {batch:>5} {hidden:>6} {strategy:<12} {statistics.median(times['sweep']):>9.4f} "
                  f"{statistics.median(times['autograd']):>10.4f} {ratio:>14.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
