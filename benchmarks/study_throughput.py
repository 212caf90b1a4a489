"""Run-steps per second of the main study's strategy mix, packed vs unpacked.

    python benchmarks/study_throughput.py                 # packs of 1, 5 and 10 at the reference setup
    python benchmarks/study_throughput.py --packs 1 9     # other pack sizes; --device cpu|cuda (default auto)
    python benchmarks/study_throughput.py --quick         # toy sizes: a smoke check whose numbers mean nothing

The main study (configs/studies/matrix_inversion_mining.yaml) trains equal numbers of runs of four strategies
at the reference setup (inverse, rank 20, batch 2048, hidden 512). Per pack size P and strategy, a pack of P
runs is built as the study builds it (harness.build.build_trainer) and one `Trainer1D.train_step` of the
whole pack (data, loss, backward, clip, Adam, EMA, bookkeeping) is timed by torch.utils.benchmark
(blocked_autorange after one warm-up step; the median; the device synchronized). run-steps/s = 4 P / (the
sum over strategies of the median pack-step seconds); x pack 1: that rate over pack 1's (the runs one after
another); model TFLOP/s: the matmul FLOPs of those run-steps (Trainer1D.measure_flops) per second.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.utils import benchmark

from diffusion_lib.harness.build import build_trainer
from diffusion_lib.harness.config import build_config

# the main study's strategies, as config layers
MIX: dict[str, dict[str, Any]] = {
    "none": {"mining.strategy": "none"},
    "random": {"mining.strategy": "random"},
    "adversarial": {"mining.strategy": "adversarial", "mining.opt_steps": 2},
    "adversarial_reference": {"mining.strategy": "adversarial", "mining.opt_steps": 2,
                              "mining.step_schedule": "reference", "mining.clamp_bound": "first_sample"},
}
REFERENCE = {"task.dataset": "inverse", "task.rank": 20, "train.batch_size": 2048, "model.hidden_dim": 512}
QUICK = {"task.dataset": "inverse", "task.rank": 3, "train.batch_size": 64, "model.hidden_dim": 32}


def pack_step(base: dict[str, Any], strategy: str, size: int, min_time: float) -> tuple[float, float]:
    """(median seconds of one pack step, FLOPs per run-step) of a pack of `size` runs of `strategy`."""
    with tempfile.TemporaryDirectory() as folder:  # nothing is written there: only train() prepares folders
        configs = [build_config(base, MIX[strategy], {"seed": seed, "results_dir": str(Path(folder) / str(seed))})
                   for seed in range(size)]  # fmt: skip
        trainer = build_trainer(configs)
        trainer.measure_flops()
        trainer.train_step()  # warm-up: the first step allocates
        timer = benchmark.Timer("trainer.train_step(); trainer.synchronize()", globals={"trainer": trainer},
                                num_threads=torch.get_num_threads())  # fmt: skip
        seconds = timer.blocked_autorange(min_run_time=min_time).median
        trainer.accelerator.free_memory()
        return seconds, trainer.flops_per_step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packs", type=int, nargs="+", default=[1, 5, 10], metavar="P", help="default: 1 5 10")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: auto")
    parser.add_argument("--min-time", type=float, default=5.0, help="seconds timed per configuration (default 5)")
    parser.add_argument("--quick", action="store_true", help="toy sizes, packs 1 2: a smoke check")
    args = parser.parse_args(argv)
    packs = [1, 2] if args.quick else sorted({1, *args.packs})
    if packs[0] < 1:
        parser.error(f"--packs: pack sizes must be >= 1, got {packs[0]}")
    base = {**(QUICK if args.quick else REFERENCE), "device": args.device}
    min_time = 0.2 if args.quick else args.min_time
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {base}")
    print(f"| pack | {' | '.join(f'{s} s/step' for s in MIX)} | run-steps/s | model TFLOP/s | x pack 1 |")
    print("|---" * (len(MIX) + 4) + "|")
    first_rate = None
    for size in packs:
        measured = {strategy: pack_step(base, strategy, size, min_time) for strategy in MIX}
        rate = len(MIX) * size / sum(seconds for seconds, _ in measured.values())
        flops = size * sum(flops for _, flops in measured.values()) / sum(seconds for seconds, _ in measured.values())
        first_rate = first_rate or rate
        steps = " | ".join(f"{seconds:.4f}" for seconds, _ in measured.values())
        print(f"| {size} | {steps} | {rate:.2f} | {flops / 1e12:.3g} | {rate / first_rate:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
