"""Training a study's runs: in this process (packs of runs as one batched model) or one run at a time
through `accelerate launch train.py`, with the signals the study gets passed on to the run; progress and
ETA lines; the --dry-run (the runs' state and what is left to train, estimated from a probe); and the
checks of the study command's flags that need no study.

Imports neither torch nor the plotting stack at the top, so the study script's --help stays fast.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import psutil

from diffusion_lib.harness.checkpoint import newest_verified_step
from diffusion_lib.harness.config import ConfigError, RunConfig
from diffusion_lib.harness.io import EXIT_BUSY
from diffusion_lib.harness.run_dir import RunDir, RunLocked
from diffusion_lib.study.spec import Study, StudyRun, pack_runs, setup_key

if TYPE_CHECKING:
    from diffusion_lib.harness.trainer import Trainer1D

ROOT = Path(__file__).resolve().parents[2]

# set by the study in the runs it launches: there the study prints the one resume command, its own
LAUNCHED_BY_STUDY = "IRED_LAUNCHED_BY_STUDY"

# builds a pack's trainer from its configs (the scripts' create_* helpers): build(configs, resume=, label=)
BuildTrainer = Callable[..., "Trainer1D"]


class RunCrashed(RuntimeError):
    """A run launched in its own processes ended without a result (crashed or was killed)."""


class RunStopped(Exception):
    """SIGINT/SIGTERM reached the study while a launched run was going, and was passed on to the run."""

    def __init__(self, run_id: str, signum: int):
        self.signum = signum
        super().__init__(f"run {run_id} stopped by {signal.Signals(signum).name}")


def check_flags(args: argparse.Namespace) -> None:
    """Refuse flags of the study command that exclude each other or are out of range (ConfigError)."""
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    if args.output is not None and not args.output.strip():
        raise ConfigError("--output '' is an empty path: name the study folder")
    if args.report_only is not None:  # the remaining flags do not apply to rebuilding a report
        return
    if args.num_processes < 1:
        raise ConfigError(f"--num-processes {args.num_processes} must be >= 1")
    if args.launcher != "accelerate" and args.num_processes != 1:
        raise ConfigError("--num-processes needs --launcher accelerate")
    if args.pack is not None and args.pack < 1:
        raise ConfigError(f"--pack {args.pack} must be >= 1")
    if args.pack not in (None, 1) and args.launcher != "inprocess":
        raise ConfigError("--pack needs the in-process launcher (a launched train.py trains one run)")
    if args.shard and args.overwrite:
        raise ConfigError("--overwrite with --shard would delete the other shards' runs; overwrite without --shard first")


def check_devices(runs: list[StudyRun], launcher: str) -> None:
    if launcher == "inprocess" and len({run.config.device for run in runs}) > 1:
        raise ConfigError("runs on different devices need --launcher accelerate (one device per process)")


def status_of(run: StudyRun) -> str:
    run_dir = RunDir(run.config.results_dir)
    final = run_dir.read_final()
    if final is not None:
        return final.get("status", "finished")
    return "partial" if run_dir.checkpoints.exists() else "to do"


def resume_step(run: StudyRun) -> int:
    """The step a run would resume from: its newest checkpoint that verifies (0 without one), so a pack
    never joins runs that would resume from different steps."""
    return newest_verified_step(RunDir(run.config.results_dir).checkpoints)


def pack_label(pack: list[StudyRun]) -> str:
    """'adversarial seed 1', 'adversarial mining.opt_steps=5 seeds 0, 1, 2'."""
    first = pack[0]
    seeds = ", ".join(str(run.seed) for run in pack)
    return " ".join([first.strategy, *(f"{k}={v}" for k, v in first.sweep.items()),
                     f"seed{'s' if len(pack) > 1 else ''} {seeds}"])


def default_pack_size(study: Study, runs: list[StudyRun], launcher: str) -> int:
    """Every seed of a group in one pack on a GPU (launch overheads dominate a lone run there); one run at
    a time on a CPU (packing gains nothing there and a run's bar is easier to follow)."""
    from diffusion_lib.models import model_packs

    if launcher != "inprocess" or not model_packs(runs[0].config.model):
        return 1
    import torch

    on_gpu = any(r.config.device == "cuda" or (r.config.device == "auto" and torch.cuda.is_available()) for r in runs)
    return len(study.seeds) if on_gpu else 1


def check_runs(runs: list[StudyRun], pack_size: int) -> None:
    """What training would refuse, refused before the study writes anything: a model that cannot take its
    task, one that holds one run at a time asked to pack more, a tracker whose package is missing."""
    from diffusion_lib.harness.trainer import check_tracker
    from diffusion_lib.models import build_model, check_packs
    from diffusion_lib.tasks import make_task

    pairs = {json.dumps([r.config.task, r.config.model], sort_keys=True): r.config for r in runs}
    try:
        check_packs(runs[0].config.model, pack_size)
        for config in pairs.values():  # building a task draws no data; the model's weights are a moment's work
            build_model(config.model, make_task(config.task))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    for kind in dict.fromkeys(r.config.train.log_with for r in runs):
        check_tracker(kind)


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def run_in_process(pack: list[StudyRun], resume: bool, label: str, build: BuildTrainer) -> list[dict]:
    """Train a pack of runs (one batched model, see Trainer1D) in this process; their final.json contents."""
    trainer = build([run.config for run in pack], resume=resume, label=label)
    try:
        return trainer.train()
    finally:
        trainer.accelerator.free_memory()  # the accelerator outlives the run: drop its references to it


def accelerate_command(config: RunConfig, config_file: Path, resume: bool, num_processes: int) -> list[str]:
    """`accelerate launch train.py --config <config_file>` for one run."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    # accelerate's --cpu means its single-process launcher; --multi_gpu is torchrun, which also runs
    # CPU processes (gloo) when the run's device is cpu
    if num_processes > 1:
        command.append("--multi_gpu")
    elif config.device == "cpu":
        command.append("--cpu")
    return command + [str(ROOT / "train.py"), "--config", str(config_file)] + (["--resume"] if resume else [])


def run_with_accelerate(run: StudyRun, resume: bool, num_processes: int) -> dict:
    """One run through `accelerate launch train.py`, from the run's resolved config."""
    # refused here, in one line, if another process is training the run (e.g. one left by a killed study);
    # the launched train.py takes the lock itself
    with RunDir(run.config.results_dir).lock():
        pass
    with tempfile.TemporaryDirectory() as folder:
        config_file = Path(folder) / "config.yaml"
        config_file.write_text(run.config.to_yaml())
        code, stopped_by = run_forwarding_signals(accelerate_command(run.config, config_file, resume, num_processes))
    final = RunDir(run.config.results_dir).read_final()
    if stopped_by is not None:
        raise RunStopped(run.run_id, stopped_by)  # the study stops too (a finished run is kept on --resume)
    if code == 2:
        raise ConfigError(f"run {run.run_id} was refused by train.py (see its message above)")
    if code == EXIT_BUSY:  # another process took the run's lock after the check above
        raise RunLocked(Path(run.config.results_dir), "another process")
    if final is None or (code != 0 and final.get("status") != "failed"):
        raise RunCrashed(f"run {run.run_id} exited with code {code} without a result (see its output above)")
    return final


def run_forwarding_signals(command: list[str]) -> tuple[int, int | None]:
    """Runs `command` in its own process group and passes each SIGINT/SIGTERM this process gets on to that
    group: the run sees a terminal's Ctrl-C once, and a signal sent to the study alone (a scheduler, a
    container's PID 1) stops it cleanly too. Returns the exit code and the first signal passed on. After a
    signal it also waits for the run's other processes (a launcher may exit before its workers have
    written their checkpoint), killing any still alive after a minute."""
    received: list[int] = []
    passed_on = 0
    launched: list[subprocess.Popen] = []
    stopping: list[psutil.Process] = []  # the run's processes when the first signal was passed on

    def pass_on() -> None:
        nonlocal passed_on
        pid = launched[0].pid
        if passed_on < len(received) and not stopping:
            with contextlib.suppress(psutil.Error):
                stopping.extend(psutil.Process(pid).children(recursive=True))
        while passed_on < len(received):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, received[passed_on])
            passed_on += 1

    def on_signal(signum: int, frame: object) -> None:
        received.append(signum)
        if launched:
            pass_on()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        launched.append(subprocess.Popen(command, cwd=ROOT, start_new_session=True,
                                         env={**os.environ, LAUNCHED_BY_STUDY: "1"}))
        pass_on()  # signals that came while it was starting
        code = launched[0].wait()
        # torchrun gives its workers 30 s before killing them; a minute covers that and a slow checkpoint
        _, alive = psutil.wait_procs(stopping, timeout=60)
        for process in alive:
            print(f"warning: process {process.pid} of the run did not stop within a minute; killing it",
                  file=sys.stderr)
            with contextlib.suppress(psutil.Error):
                process.kill()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code, (received[0] if received else None)


def train_all(runs: list[StudyRun], pack_size: int, build: BuildTrainer, *, resume: bool, launcher: str,
              num_processes: int) -> None:
    """Train `runs` pack by pack (skipping finished and failed ones on `resume`), with a line per pack and run."""
    todo = []
    for run in runs:
        status = status_of(run)
        if status in ("finished", "failed") and resume:
            print(f"{run.run_id}: already {status}, skipped")
        else:
            todo.append(run)
    packs = pack_runs(todo, pack_size, resume_step)
    seconds_per_run: list[float] = []
    left = len(todo)
    for i, pack in enumerate(packs, 1):
        tag = f"[{i}/{len(packs)}] {pack_label(pack)}"
        eta = f" (ETA {format_seconds(statistics.mean(seconds_per_run) * left)})" if seconds_per_run else ""
        print(f"{tag}: starting{eta}", flush=True)
        started = time.perf_counter()
        # with --resume, a run that never reached a checkpoint starts over inside its folder
        if launcher == "accelerate":
            finals = [run_with_accelerate(pack[0], resume, num_processes)]
        else:
            finals = run_in_process(pack, resume, tag, build)
        seconds = time.perf_counter() - started
        seconds_per_run.append(seconds / len(pack))
        left -= len(pack)
        for run, final in zip(pack, finals):  # a failed run is marked so in its final.json; the study goes on
            if final.get("status") == "finished":
                metric = next(iter(final["metrics"]))  # the task's headline metric, on each held-out set
                scores = ", ".join(f"{name} {final[f'{metric}_{name}']:.3g}" for name in final["sets"])
                print(f"{tag}: {run.run_id} done in {format_seconds(seconds)}: {final['metric_labels'][metric]} (EMA) "
                      f"{scores}", flush=True)
            else:
                print(f"{tag}: {run.run_id} FAILED: {final.get('error')}", flush=True)


# -- --dry-run -----------------------------------------------------------------------------------------
def dry_run(runs: list[StudyRun], pack_size: int, build: BuildTrainer, *, resume: bool, overwrite: bool) -> None:
    """List the runs with their state, and estimate what is left to train from a probe per distinct setup:
    the measured FLOPs of a step (as the runs measure them) and the median time of a few steps."""
    print(f"{len(runs)} runs in {Path(runs[0].config.results_dir).parent.parent} (packs of up to {pack_size}):")
    total_seconds, total_flops = data_seconds(runs), 0.0
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
    print(f"estimated cost: ~{format_seconds(total_seconds)} of making data and training on this machine "
          f"(validation and final scoring extra), {total_flops:.3g} training FLOP (matmuls, measured per step)")


def data_seconds(runs: list[StudyRun]) -> float:
    """Seconds to make the runs' data that is not cached yet (Sudoku's carving), estimated and said if any."""
    from diffusion_lib.tasks.base import make_task

    setups = {json.dumps([r.config.task, r.config.eval.num_samples], sort_keys=True): r.config for r in runs}
    seconds = sum(make_task(c.task).preparation_seconds(c.eval.num_samples) for c in setups.values())
    if seconds:
        print(f"  data not cached yet, made before the first step (Sudoku: carved): ~{format_seconds(seconds)}")
    return seconds


def probe_steps(pack: list[StudyRun], build: BuildTrainer, steps: int = 3) -> tuple[float, float]:
    """(FLOPs per step per run, seconds per step per run) of a pack's setup, measured in memory on a copy
    of the pack (nothing is written): FLOPs as the runs count them, time as the median of a few steps."""
    from diffusion_lib.tasks.base import TASKS

    with tempfile.TemporaryDirectory() as folder:
        # a step costs the same on two held-out problems and under the task's probe options: no long carving
        probes = [dataclasses.replace(run.config, results_dir=str(Path(folder) / str(i)),
                                      task={**run.config.task, **TASKS[run.config.task["dataset"]].probe_options},
                                      eval=dataclasses.replace(run.config.eval, num_samples=2))
                  for i, run in enumerate(pack)]
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
