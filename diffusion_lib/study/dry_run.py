"""A study's --dry-run: its runs with their state, and what is left to train, estimated from a probe."""
from __future__ import annotations

import dataclasses
import math
import statistics
import tempfile
import time
from pathlib import Path

from diffusion_lib.study.launch import BuildTrainer, format_seconds, resume_step, status_of
from diffusion_lib.study.spec import StudyRun, pack_runs, setup_key


def dry_run(runs: list[StudyRun], pack_size: int, build: BuildTrainer, *, resume: bool, overwrite: bool) -> None:
    """List the runs with their state, and estimate what is left to train from a probe per distinct setup:
    the measured FLOPs of a step (as the runs measure them) and the median time of a few steps."""
    print(f"{len(runs)} runs in {Path(runs[0].config.results_dir).parent.parent} (packs of up to {pack_size}):")
    total_seconds = total_flops = 0.0
    probes: dict[tuple[str, int], tuple[float, float]] = {}  # packs of one setup cost alike: probe each once
    for pack in pack_runs(runs, pack_size, lambda run: 0):
        setup = (setup_key(pack[0]), len(pack))
        if setup not in probes:
            probes[setup] = probe_steps(pack, build)
        flops_per_step, seconds_per_step = probes[setup]
        for run in pack:
            status = status_of(run) if (resume or overwrite) else "to do"
            status = "to do" if overwrite else status
            budget = run.config.train.budget_flops
            steps = math.ceil(budget / flops_per_step) if budget > 0 else run.config.train.steps
            done = steps if status in ("finished", "failed") else (resume_step(run) if status == "partial" else 0)
            left = max(steps - done, 0)
            total_seconds += left * seconds_per_step
            total_flops += left * flops_per_step
            state = f"{status} (step {done})" if status == "partial" else status
            print(f"  {run.run_id:<48} {state:<18} {left} of {steps} steps left, "
                  f"~{format_seconds(left * seconds_per_step)}, {left * flops_per_step:.3g} FLOP")
    print(f"estimated cost: ~{format_seconds(total_seconds)} of training on this machine "
          f"(validation and final scoring extra), {total_flops:.3g} training FLOP (matmuls, measured per step)")


def probe_steps(pack: list[StudyRun], build: BuildTrainer, steps: int = 3) -> tuple[float, float]:
    """(FLOPs per step per run, seconds per step per run) of a pack's setup, measured in memory on a copy
    of the pack (nothing is written): FLOPs as the runs count them, time as the median of a few steps."""
    with tempfile.TemporaryDirectory() as folder:
        probes = [dataclasses.replace(run.config, results_dir=str(Path(folder) / str(i))) for i, run in enumerate(pack)]
        trainer = build(probes)
        trainer.measure_flops()
        times = []
        for _ in range(steps + 1):
            started = time.perf_counter()
            trainer.train_step()
            trainer.synchronize()
            times.append(time.perf_counter() - started)
        trainer.accelerator.free_memory()
        return trainer.flops_per_step, statistics.median(times[1:]) / len(pack)
