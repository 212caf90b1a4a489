"""Aggregate training throughput of the main study's strategy mix: packs of P runs vs separate processes.

    python benchmarks/study_throughput.py                 # device auto; appends a section to benchmarks/results.md
    python benchmarks/study_throughput.py --quick         # smoke check at toy sizes; writes nothing

The main study (configs/studies/matrix_inversion_mining.yaml) trains equal numbers of runs of four strategies
at the reference setup (inverse, rank 20, batch 2048, hidden 512): none, random, adversarial (opt_steps
2) and adversarial_reference (the same with step_schedule reference, clamp_bound first_sample). This
script measures how many run-steps per second that mix gets:

- as packs of P runs (P = 1, 5, 10 by default): one Trainer1D per (P, strategy), built as the study
  builds them (build_config, train.create_trainer), all alive in this process at once. After a warm-up,
  `Trainer1D.train_step` (data, loss, backward, clip, Adam, EMA, bookkeeping) is timed round-robin over
  every configuration, one step each per round, the device synchronized before each clock read.
  Aggregate rate of pack size P = 4 P run-steps / (sum over strategies of the median pack-step seconds).
  Pack 1 is training the runs one after another (sequential), the baseline of the `x pack 1` ratios,
  which are medians over rounds of the per-round ratio;
- as K separate processes, each training single runs of the four strategies (round-robin as above),
  torch threads split between them, all timed over the same window: every process keeps stepping until
  the slowest has its rounds, and steps that ended after that are dropped, so each measured step ran
  with all K processes busy. Aggregate rate = sum over processes of 4 / (sum of its median seconds).
  The `x separate` ratio compares rates measured one after the other, not interleaved.

Printed: the device, torch version, threads, dtype, matmul precision, the table and the ratio of a
`random` pack step to a `none` pack step. The same section, dated, is appended to --out.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import resource
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/study_throughput.py` puts benchmarks/, not the root, on the path
    sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from benchmarks.throughput import cpu_model  # noqa: E402
from diffusion_lib.harness.config import RunConfig, build_config  # noqa: E402
from diffusion_lib.harness.trainer import Trainer1D  # noqa: E402

# the main study's strategies (configs/studies/matrix_inversion_mining.yaml), as config layers
MIX: dict[str, dict[str, Any]] = {
    "none": {"mining.strategy": "none"},
    "random": {"mining.strategy": "random"},
    "adversarial": {"mining.strategy": "adversarial", "mining.opt_steps": 2},
    "adversarial_reference": {"mining.strategy": "adversarial", "mining.opt_steps": 2,
                              "mining.step_schedule": "reference", "mining.clamp_bound": "first_sample"},
}
REFERENCE = {"task.dataset": "inverse", "task.rank": 20, "train.batch_size": 2048, "model.hidden_dim": 512}
QUICK = {"task.dataset": "inverse", "task.rank": 3, "train.batch_size": 64, "model.hidden_dim": 32}
PROTOCOL = "@@"  # prefix of the lines a worker process and this script exchange (other output is ignored)
Key = tuple[int, str]  # (pack size, strategy)


# -- building and timing trainers -----------------------------------------------------------------------
def pack_configs(base: dict[str, Any], strategy: str, seeds: list[int], folder: Path) -> list[RunConfig]:
    return [build_config(base, MIX[strategy], {"seed": seed, "results_dir": str(folder / f"{strategy}-{seed}")})
            for seed in seeds]


def make_trainer(base: dict[str, Any], strategy: str, seeds: list[int], folder: Path) -> Trainer1D:
    """A pack of len(seeds) runs of `strategy`, as the study builds it (nothing is written to `folder`:
    only Trainer1D.train() prepares run folders)."""
    configs = pack_configs(base, strategy, seeds, folder)
    task = train.create_dataset(configs[0])
    return train.create_trainer(configs, train.create_diffusion_model(configs, task), task)


def kernel_seconds() -> float:
    """CPU seconds this process has spent in the kernel (page faults of fresh allocations show up here)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def timed_step(trainer: Trainer1D) -> tuple[float, float]:
    """Wall seconds of one train_step, the device's queue drained before and after (CUDA runs
    asynchronously), and the kernel CPU seconds it took."""
    trainer.synchronize()
    start, kernel = time.perf_counter(), kernel_seconds()
    trainer.train_step()
    trainer.synchronize()
    return time.perf_counter() - start, kernel_seconds() - kernel


def warm_up(trainers: dict[Any, Trainer1D], rounds: int) -> None:
    for _ in range(rounds):
        for trainer in trainers.values():
            timed_step(trainer)


def rotation(keys: list, round_index: int) -> list:
    """The round's order: each round starts one configuration later, so none always follows the same one."""
    shift = round_index % len(keys)
    return keys[shift:] + keys[:shift]


def data_seconds(trainer: Trainer1D, repeats: int = 5) -> float:
    """Median seconds of one run's training batch drawn from the task on the device, alone (every run of a
    pack draws its own at the start of each step): on a GPU, a slow batched solver would show here."""
    generator = torch.Generator(device=trainer.accelerator.device).manual_seed(0)
    times = []
    for _ in range(repeats + 1):  # the first draw warms up
        trainer.synchronize()
        start = time.perf_counter()
        trainer.task.sample(trainer.local_batch, generator)
        trainer.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def median_seconds(times: dict[Any, list[float]]) -> dict[Any, float]:
    return {key: statistics.median(values) for key, values in times.items()}


# -- packs in this process --------------------------------------------------------------------------------
def measure_packs(base: dict[str, Any], packs: list[int], rounds: int, warmup: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        trainers: dict[Key, Trainer1D] = {
            (size, strategy): make_trainer(base, strategy, list(range(size)), Path(folder) / f"pack{size}")
            for size in packs for strategy in MIX
        }
        first = next(iter(trainers.values()))
        # FLOPs per run-step do not depend on the pack size: count them on the smallest pack
        for strategy in MIX:
            trainers[(packs[0], strategy)].measure_flops()
        flops = {strategy: trainers[(packs[0], strategy)].flops_per_step for strategy in MIX}
        print(f"warming up {len(trainers)} trainers ...", flush=True)
        warm_up(trainers, warmup)
        keys = list(trainers)
        times: dict[Key, list[float]] = {key: [] for key in keys}
        kernel = {size: 0.0 for size in packs}
        for r in range(rounds):
            for key in rotation(keys, r):
                seconds, in_kernel = timed_step(trainers[key])
                times[key].append(seconds)
                kernel[key[0]] += in_kernel
            print(f"round {r + 1}/{rounds}: " + ", ".join(
                f"P={size} {sum(times[(size, s)][-1] for s in MIX):.3f} s" for size in packs), flush=True)
        device = first.accelerator.device
        info = {"device": device_name(device), "dtype": first.config.model["dtype"],
                "matmul_precision": torch.get_float32_matmul_precision(), "data_s": data_seconds(first)}
        accelerator = first.accelerator
        del first
        trainers.clear()
    accelerator.free_memory()  # it holds every model and optimiser it prepared: let them go before the processes
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    kernel_share = {size: kernel[size] / sum(sum(times[(size, s)]) for s in MIX) for size in packs}
    return {"times": times, "flops": flops, "info": info, "kernel_share": kernel_share}


# -- separate processes ----------------------------------------------------------------------------------
def worker(spec: dict[str, Any], stdin: TextIO = sys.stdin) -> None:
    """One of K separate processes: single runs of every strategy, round-robin, until told to stop.

    Protocol (lines prefixed PROTOCOL): it says `ready` after warming up and waits for `go`; says `done`
    once it has `rounds` rounds but keeps stepping, so the others still share the machine with it; on
    `stop T` it keeps the steps that ended by T (time.monotonic, one clock for every process on Linux)
    and prints their medians as JSON.
    """
    torch.set_num_threads(spec["threads"])
    with tempfile.TemporaryDirectory() as folder:
        trainers = {s: make_trainer(spec["base"], s, [spec["seed"]], Path(folder)) for s in MIX}
        warm_up(trainers, spec["warmup"])
        print(f"{PROTOCOL} ready", flush=True)
        stdin.readline()  # go
        keys, steps, rounds_done, stop_at = list(trainers), [], 0, None
        while stop_at is None:
            for key in rotation(keys, rounds_done):
                seconds, in_kernel = timed_step(trainers[key])
                steps.append((key, time.monotonic(), seconds, in_kernel))
                if select.select([stdin], [], [], 0)[0]:
                    stop_at = float(stdin.readline().split()[-1])
                    break
            else:
                rounds_done += 1
                if rounds_done == spec["rounds"]:
                    print(f"{PROTOCOL} done", flush=True)
    kept = [(key, seconds, in_kernel) for key, ended, seconds, in_kernel in steps if ended <= stop_at]
    times = {s: [seconds for key, seconds, _ in kept if key == s] for s in MIX}
    kernel_share = sum(k for _, _, k in kept) / sum(seconds for _, seconds, _ in kept)
    print(f"{PROTOCOL} " + json.dumps({"median_s": median_seconds(times), "steps": {s: len(v) for s, v in times.items()},
                                       "kernel_share": kernel_share}), flush=True)


def _protocol_line(process: subprocess.Popen, log: Path) -> str:
    """The worker's next protocol line (its other output is skipped); fails with its log if it died."""
    while True:
        line = process.stdout.readline()
        if not line:
            process.wait()
            raise RuntimeError(f"worker exited with code {process.returncode}:\n{log.read_text()[-4000:]}")
        if line.startswith(PROTOCOL):
            return line[len(PROTOCOL):].strip()


def measure_processes(base: dict[str, Any], count: int, threads: int, rounds: int, warmup: int) -> dict[str, Any]:
    spec = {"base": base, "threads": threads, "rounds": rounds, "warmup": warmup}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker"]
    with tempfile.TemporaryDirectory() as logs:
        processes, log_paths = [], []
        try:
            for k in range(count):
                log_paths.append(Path(logs) / f"worker{k}.log")
                with open(log_paths[-1], "w") as log:
                    processes.append(subprocess.Popen(
                        [*command, json.dumps({**spec, "seed": k})], cwd=ROOT, text=True,
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log))
            for process, log in zip(processes, log_paths):
                _protocol_line(process, log)  # ready
            print(f"{count} processes ready; timing ...", flush=True)
            for process in processes:
                process.stdin.write("go\n")
                process.stdin.flush()
            for process, log in zip(processes, log_paths):
                _protocol_line(process, log)  # done
            stop_at = time.monotonic()
            for process in processes:
                process.stdin.write(f"stop {stop_at!r}\n")
                process.stdin.flush()
            results = [json.loads(_protocol_line(process, log)) for process, log in zip(processes, log_paths)]
            for process in processes:
                process.wait()
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
    return {"count": count, "threads": threads, "workers": results}


# -- the machine ------------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), host {cpu_model()}"
    return f"{device.type}: {cpu_model()}, {os.cpu_count()} cores"


def malloc_settings(on_cpu: bool) -> str:
    """How glibc's malloc was set (it changes CPU timings of large packs a lot): the trainer's own setting on a
    CPU (diffusion_lib.harness.malloc.keep_freed_memory), and any tunables from the environment."""
    names = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES", "LD_PRELOAD")
    settings = [f"{name}={os.environ[name]}" for name in names if name in os.environ]
    if on_cpu:
        settings.insert(0, "the trainer's keep_freed_memory() (no mmap per block, no trimming)")
    return ", ".join(settings) or "glibc defaults"


def load_average() -> str:
    try:
        return "/".join(f"{v:.2f}" for v in os.getloadavg())
    except (AttributeError, OSError):
        return "n/a"


# -- summary ----------------------------------------------------------------------------------------------
def summarize(packs: dict[str, Any], processes: dict[str, Any] | None, sizes: list[int]) -> dict[str, Any]:
    times, flops = packs["times"], packs["flops"]
    medians = median_seconds(times)
    rounds = len(next(iter(times.values())))
    rows = []
    for size in sizes:
        total = sum(medians[(size, s)] for s in MIX)
        per_round_gain = [size * sum(times[(1, s)][r] for s in MIX) / sum(times[(size, s)][r] for s in MIX)
                          for r in range(rounds)]
        rows.append({
            "label": f"pack {size}",
            "seconds": {s: medians[(size, s)] for s in MIX},
            "rate": len(MIX) * size / total,
            "tflops": size * sum(flops.values()) / total / 1e12,
            "vs_pack1": statistics.median(per_round_gain),
            "random_vs_none": statistics.median(a / b for a, b in zip(times[(size, "random")], times[(size, "none")])),
            "kernel_share": packs["kernel_share"][size],
        })
    if processes:
        workers = processes["workers"]
        rate = sum(len(MIX) / sum(w["median_s"].values()) for w in workers)
        rows.append({
            "label": f"{processes['count']} processes x 1 run, {processes['threads']} thread(s) each",
            "seconds": {s: statistics.mean(w["median_s"][s] for w in workers) for s in MIX},
            "rate": rate,
            "tflops": sum(sum(flops[s] for s in MIX) / sum(w["median_s"].values()) for w in workers) / 1e12,
            "vs_pack1": rate / rows[0]["rate"],
            "random_vs_none": statistics.median(w["median_s"]["random"] / w["median_s"]["none"] for w in workers),
            "steps": min(min(w["steps"].values()) for w in workers),
            "kernel_share": statistics.mean(w["kernel_share"] for w in workers),
        })
        for row in rows:
            row["vs_separate"] = row["rate"] / rate
    return {"rows": rows, "rounds": rounds}


def table(summary: dict[str, Any]) -> list[str]:
    header = ("| configuration | " + " | ".join(f"{s} s/step" for s in MIX) +
              " | run-steps/s | model TFLOP/s | x pack 1 | x separate processes | random / none | kernel CPU / wall |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in summary["rows"]:
        separate = f"{row['vs_separate']:.2f}" if "vs_separate" in row else "n/a"
        lines.append(f"| {row['label']} | " + " | ".join(f"{row['seconds'][s]:.4f}" for s in MIX) +
                     f" | {row['rate']:.2f} | {row['tflops']:.3g} | {row['vs_pack1']:.2f} | {separate} "
                     f"| {row['random_vs_none']:.2f} | {row['kernel_share']:.2f} |")
    return lines


def section(summary: dict[str, Any], info: dict[str, str], base: dict[str, Any], args: argparse.Namespace,
            command: str, seconds: float, loads: tuple[str, str]) -> str:
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    mix = "; ".join(f"{name}: " + ", ".join(f"{k.split('.', 1)[1]} {v}" for k, v in layer.items())
                    for name, layer in MIX.items())
    separate = summary["rows"][-1] if "steps" in summary["rows"][-1] else None
    random_vs_none = ", ".join(f"{row['label']}: {row['random_vs_none']:.2f}x" for row in summary["rows"])
    lines = [
        f"# Study throughput, {date}",
        "",
        f"Generated by `{command}` in {seconds:.0f} s{' (quick: toy sizes, numbers meaningless)' if args.quick else ''}.",
        "",
        f"- device: {info['device']}; torch {torch.__version__}; {info['threads']} torch threads in this process; "
        f"dtype {info['dtype']}; float32 matmul precision {info['matmul_precision']}; load average (1/5/15 min) "
        f"{loads[0]} before, {loads[1]} after.",
        f"- setup: {base['task.dataset']}, rank {base['task.rank']}, batch {base['train.batch_size']}, hidden "
        f"{base['model.hidden_dim']}; the main study's strategies ({mix}), the same number of runs of each.",
        f"- s/step: median seconds of one `Trainer1D.train_step` of the whole pack (data, loss, backward, clip, Adam, "
        f"EMA every 10 steps, bookkeeping), device synchronized; {args.warmup} warm-up round(s), then "
        f"{summary['rounds']} rounds round-robin over all packs, every trainer alive in one process.",
        f"- run-steps/s: {len(MIX)} P / (sum of the four s/step); model TFLOP/s: the matmul FLOPs those run-steps "
        "do (counted by Trainer1D.measure_flops) per second; x pack 1: median over rounds of the per-round ratio "
        "of rates against pack 1 (the runs one after another); x separate processes: ratio of rates against the "
        "separate-process row, measured after the packs (not interleaved); kernel CPU / wall: CPU seconds spent in "
        "the kernel per wall second of the timed steps (on a CPU mostly page faults: glibc maps every block above "
        f"its mmap threshold afresh; malloc settings here: {malloc_settings(info['device'].startswith('cpu'))}).",
    ]
    pack1_none = summary["rows"][0]["seconds"]["none"]
    lines.append(f"- data alone: one run's batch from the task on the device takes {info['data_s'] * 1e3:.2f} ms (median "
                 f"of 5), {info['data_s'] / pack1_none:.0%} of a pack-1 none step; a pack draws one per run.")
    if separate:
        lines.append(f"- separate processes: {separate['label']}, each its own seeds, all timed over one window "
                     f"(at least {separate['steps']} steps per strategy and process); s/step there is the mean "
                     "over processes of each one's median.")
    lines += ["", *table(summary), "", f"random / none pack-step time (the issue's goal on a GPU: <= ~1.2): "
              f"{random_vs_none}.", ""]
    return "\n".join(lines)


# -- command line -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: auto")
    parser.add_argument("--packs", type=int, nargs="+", default=[1, 5, 10], metavar="P",
                        help="pack sizes (default 1 5 10; 1, the sequential baseline, is always measured)")
    parser.add_argument("--steps", type=int, help="timed rounds (one step of every configuration each); "
                                                  "default 40 on a GPU, 7 on a CPU")
    parser.add_argument("--warmup", type=int, help="untimed rounds first (default 3 on a GPU, 1 on a CPU)")
    parser.add_argument("--processes", type=int, metavar="K",
                        help="separate processes of single runs (default 9 on a GPU, 2 on a CPU; 0: skip)")
    parser.add_argument("--threads", type=int, help="torch threads here, split between the K processes "
                                                    "(default: torch's default)")
    parser.add_argument("--matmul-precision", choices=("highest", "high"), default="highest",
                        help="float32 matmuls: highest (IEEE) or high (TF32 on a GPU)")
    parser.add_argument("--quick", action="store_true", help="toy sizes, 2 steps, packs 1 2: a smoke check; "
                                                             "writes nothing unless --out is given")
    parser.add_argument("--out", help="markdown file to append the dated section to (default: benchmarks/results.md)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    packs = sorted({1, *([1, 2] if args.quick else args.packs)})
    if any(p < 1 for p in packs):
        parser.error("--packs: pack sizes must be >= 1")
    args.steps = args.steps or (2 if args.quick else 40 if gpu else 7)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick or not gpu else 3)
    count = args.processes if args.processes is not None else (9 if gpu else 2)
    base = {**(QUICK if args.quick else REFERENCE), "device": args.device,
            "train.matmul_precision": args.matmul_precision}

    started, load_before = time.perf_counter(), load_average()
    print(f"packs {packs}, {args.steps} rounds after {args.warmup} warm-up, then {count} separate processes; "
          f"torch {torch.__version__}, {threads} threads", flush=True)
    packed = measure_packs(base, packs, args.steps, args.warmup)
    info = {**packed["info"], "threads": str(threads)}
    print(f"device: {info['device']}; dtype {info['dtype']}; matmul precision {info['matmul_precision']}", flush=True)
    processes = None
    if count > 0:
        print(f"starting {count} separate processes ...", flush=True)
        processes = measure_processes(base, count, max(1, threads // count), args.steps, args.warmup)
    summary = summarize(packed, processes, packs)
    command = " ".join(["python benchmarks/study_throughput.py", *argv])
    text = section(summary, info, base, args, command, time.perf_counter() - started, (load_before, load_average()))
    print(text)
    out = args.out or (None if args.quick else str(ROOT / "benchmarks" / "results.md"))
    if out:
        path = Path(out)
        previous = path.read_text().rstrip("\n") + "\n\n" if path.exists() else ""
        path.write_text(previous + text)
        print(f"appended to {out}")


if __name__ == "__main__":
    main()
