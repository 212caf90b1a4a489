"""How fast are the library's training step and sampler, and does the MLP's explicit ∇_y E sweep still pay
against the EnergyModel default (autograd)?

    python benchmarks/step_speed.py           # rank 20 batch 2048 and rank 5 batch 256, hidden 512, on the CPU
    python benchmarks/step_speed.py --quick   # toy sizes: a smoke check whose numbers mean nothing

One full training step (data + loss + backward + grad-norm clip 1.0 + Adam) of one run per strategy (none,
random, adversarial with opt_steps 2), and sampling 256 rank-20 problems (10 timesteps x 5 inner steps), each
with `model.grad: sweep` (the MLP as it trains) and `model.grad: autograd` (the same weights through the base
class's autograd path). Timed by torch.utils.benchmark (blocked_autorange after one warm-up call; the
median); autograd / sweep > 1: the sweep is faster.
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch
from torch.utils import benchmark

from diffusion_lib.diffusion import GaussianDiffusion1D
from diffusion_lib.mining import resolve_mining_config
from diffusion_lib.models import build_model
from diffusion_lib.tasks.base import make_task

STRATEGIES = ("none", "random", "adversarial")
GRADS = ("sweep", "autograd")
FULL = {"shapes": ((20, 2048), (5, 256)), "hidden": 512, "sample": (20, 256, 5)}  # sample: rank, problems, inner
QUICK = {"shapes": ((3, 32),), "hidden": 32, "sample": (3, 16, 2)}


def setup(grad: str, strategy: str, rank: int, hidden: int) -> tuple[GaussianDiffusion1D, object]:
    """A fresh model and its task; the same weights for either gradient path (runs initialise from their index)."""
    task = make_task({"dataset": "inverse", "rank": rank})
    model = build_model({"name": "mlp", "hidden_dim": hidden, "grad": grad}, task)
    return GaussianDiffusion1D(model, mining_config=resolve_mining_config({"strategy": strategy, "opt_steps": 2})), task


def train_step(grad: str, strategy: str, rank: int, batch: int, hidden: int) -> Callable[[], None]:
    diffusion, task = setup(grad, strategy, rank, hidden)
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


def sampling(grad: str, rank: int, problems: int, inner: int, hidden: int) -> Callable[[], None]:
    diffusion, task = setup(grad, "none", rank, hidden)
    generator = torch.Generator().manual_seed(0)
    x = task.sample(problems, generator)[0]
    noise = torch.randn(1, problems, task.out_dim, generator=generator)
    return lambda: diffusion.sample(x, noise=noise, inner_steps=inner)


def seconds(call: Callable[[], None], min_time: float) -> float:
    call()  # warm-up
    timer = benchmark.Timer("call()", globals={"call": call}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_time).median


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--min-time", type=float, default=3.0, help="seconds timed per row and path (default 3)")
    parser.add_argument("--quick", action="store_true", help="toy sizes: a smoke check")
    args = parser.parse_args(argv)
    sizes, min_time = (QUICK, 0.1) if args.quick else (FULL, args.min_time)
    rows = {f"{strategy} step, rank {rank}, batch {batch}": [train_step(g, strategy, rank, batch, sizes["hidden"])
                                                              for g in GRADS]
            for rank, batch in sizes["shapes"] for strategy in STRATEGIES}  # fmt: skip
    rank, problems, inner = sizes["sample"]
    rows[f"sampling {problems} rank-{rank} problems, 10 x {inner}"] = [
        sampling(g, rank, problems, inner, sizes["hidden"]) for g in GRADS]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, hidden {sizes['hidden']}")
    print("| what | sweep s | per s | autograd s | autograd / sweep |\n|---|---|---|---|---|")
    for name, calls in rows.items():
        sweep, autograd = (seconds(call, min_time) for call in calls)
        print(f"| {name} | {sweep:.4f} | {1 / sweep:.2f} | {autograd:.4f} | {autograd / sweep:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
