"""Does adversarial negative mining help on matrix inversion? Every strategy x seed, then the report.

    python experiments/matrix_inversion_mining_comparison.py --config configs/quick.yaml
    python experiments/matrix_inversion_mining_comparison.py --config configs/quick.yaml --resume
    python experiments/matrix_inversion_mining_comparison.py --report-only results/quick

Runs are built with train.py's helpers and trained by Trainer1D; this script only orchestrates:
which runs, in which order, which to skip or resume, and the report at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# light modules only up here (--help answers without torch or matplotlib); the rest is imported where used
from diffusion_lib.checkpoint import newest_verified_step  # noqa: E402
from diffusion_lib.config import ConfigError, parse_overrides  # noqa: E402
from diffusion_lib.mining import STRATEGIES  # noqa: E402
from diffusion_lib.results import RunDir, TrainingInterrupted  # noqa: E402
from diffusion_lib.study import (  # noqa: E402
    Study, StudyDir, StudyRun, expand, load_study, pack_runs, parse_shard, select, setup_key, shard,
)
from train import (  # noqa: E402
    LAUNCHED_BY_STUDY, OneLineParser, create_dataset, create_diffusion_model, create_trainer, parse_command_line,
    run_explaining_errors,
)

DEFAULT_CONFIG = ROOT / "configs" / "matrix_inversion_mining.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="matrix_inversion_mining_comparison.py", description=__doc__.split("\n\n")[0],
                           allow_abbrev=False)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="study YAML (default: the full study)")
    parser.add_argument("--output", help="study folder (default: results/<study name>)")
    parser.add_argument("--strategies", nargs="+", metavar="LABEL", help="run only these strategy labels")
    parser.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="replace the study's seeds")
    parser.add_argument("--resume", action="store_true", help="keep finished runs, continue partial ones")
    parser.add_argument("--overwrite", action="store_true", help="delete the study folder's runs and start over")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and estimate their cost; train nothing")
    parser.add_argument("--report-only", nargs="?", const="", metavar="DIR",
                        help="rebuild tables and plots from the runs saved in DIR (default: the study folder)")
    parser.add_argument("--shard", metavar="I/N", help="run only the I-th of N disjoint slices of the runs (0 <= I < N)")
    parser.add_argument("--launcher", choices=("inprocess", "accelerate"), default="inprocess",
                        help="train each run in this process, or through `accelerate launch`")
    parser.add_argument("--num-processes", type=int, default=1, help="processes per run with --launcher accelerate")
    parser.add_argument("--pack", type=int, metavar="P",
                        help="train up to P runs that differ only in seed as one batched model (default: every "
                             "seed of a group on a GPU, 1 on a CPU; in-process launcher only)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of the base run config")
    return parser


def describe(study: Study) -> str:
    """The report's description: the study file's text (unless it names strategies this study does not
    run, e.g. after --strategies), then what was actually run, from the first run's resolved config."""
    config = study.runs[0].config
    run_strategies = set(study.strategies) | {m.get("strategy") for m in study.strategies.values()}
    absent = [name for name in STRATEGIES if name not in run_strategies
              and re.search(rf"\b{re.escape(name)}\b", study.description)]  # fmt: skip
    text = study.description.strip()
    if absent:  # the file's description was written for its full set of strategies
        text = (f"(The study file's description is left out: it names {', '.join(absent)}, which this study does "
                "not run.)")
    budget = config.train.budget_flops  # 0: the runs trained train.steps
    length = f"a budget of {budget:.3g} training FLOPs" if budget else f"{config.train.steps} steps"
    flow = {label: yaml.safe_dump(mining, default_flow_style=True, sort_keys=False, width=10**6).strip()
            for label, mining in study.strategies.items()}  # fmt: skip
    lines = [
        text,
        f"Strategies ({len(flow)}): " + "; ".join(f"`{label}: {mining}`" for label, mining in flow.items()) + ".",
        f"Task: {config.task['dataset']}, rank {config.task.get('rank')}{' (trained on ood)' if config.task.get('ood') else ''}; "
        f"{length} of batch {config.train.batch_size}, lr {config.train.lr}, "
        f"{config.diffusion.timesteps} diffusion steps, hidden {config.model.get('hidden_dim')}; "
        f"held-out sets of {config.eval.num_samples} problems; seeds {', '.join(map(str, study.seeds))}.",
    ]
    if study.sweep:
        lines.append("Sweep: " + "; ".join(f"{key} in {values}" for key, values in study.sweep.items()) + ".")
    return "\n\n".join(line for line in lines if line)


def status_of(run: StudyRun) -> str:
    run_dir = RunDir(run.config.results_dir)
    final = run_dir.read_final()
    if final is not None:
        return final.get("status", "finished")
    return "partial" if run_dir.checkpoints.exists() else "to do"


def run_in_process(pack: list[StudyRun], resume: bool, label: str = "") -> list[dict]:
    """Train a pack of runs (one batched model, see Trainer1D) in this process; their final.json contents."""
    configs = [run.config for run in pack]
    task = create_dataset(configs[0])
    trainer = create_trainer(configs, create_diffusion_model(configs, task), task, resume=resume, label=label)
    try:
        return trainer.train()
    finally:
        trainer.accelerator.free_memory()  # the accelerator outlives the run: drop its references to it


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


def check_model_packs(runs: list[StudyRun], pack_size: int) -> None:
    """A model that holds one run at a time trains with pack 1; asking for more is refused in one line."""
    from diffusion_lib.models import check_packs

    try:
        check_packs(runs[0].config.model, pack_size)
    except ValueError as error:
        raise ConfigError(str(error)) from None


class RunCrashed(RuntimeError):
    """A run launched in its own processes ended without a result (crashed or was killed)."""


class RunStopped(Exception):
    """SIGINT/SIGTERM reached this script while a launched run was going, and was passed on to the run."""

    def __init__(self, run_id: str, signum: int):
        self.signum = signum
        super().__init__(f"run {run_id} stopped by {signal.Signals(signum).name}")


def run_forwarding_signals(command: list[str]) -> tuple[int, int | None]:
    """Runs `command` in its own process group and passes each SIGINT/SIGTERM this script gets on to that
    group: the run sees a terminal's Ctrl-C once, and a signal sent to this script alone (a scheduler, a
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


def run_with_accelerate(run: StudyRun, resume: bool, num_processes: int) -> dict:
    """One run through `accelerate launch train.py`, from the run's resolved config."""
    # refused here, in one line, if another process is training the run (e.g. one left by a killed study);
    # the launched train.py takes the lock itself
    with RunDir(run.config.results_dir).lock():
        pass
    with tempfile.TemporaryDirectory() as folder:
        config_file = Path(folder) / "config.yaml"
        config_file.write_text(run.config.to_yaml())
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        # accelerate's --cpu means its single-process launcher; --multi_gpu is torchrun, which also runs
        # CPU processes (gloo) when the run's device is cpu
        if num_processes > 1:
            command.append("--multi_gpu")
        elif run.config.device == "cpu":
            command.append("--cpu")
        command += [str(ROOT / "train.py"), "--config", str(config_file)] + (["--resume"] if resume else [])
        code, stopped_by = run_forwarding_signals(command)
    final = RunDir(run.config.results_dir).read_final()
    if stopped_by is not None:
        raise RunStopped(run.run_id, stopped_by)  # the study stops too (a finished run is kept on --resume)
    if code == 2:
        raise ConfigError(f"run {run.run_id} was refused by train.py (see its message above)")
    if final is None or (code != 0 and final.get("status") != "failed"):
        raise RunCrashed(f"run {run.run_id} exited with code {code} without a result (see its output above)")
    return final


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def train_all(runs: list[StudyRun], args: argparse.Namespace, pack_size: int) -> None:
    todo = []
    for run in runs:
        status = status_of(run)
        if status in ("finished", "failed") and args.resume:
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
        if args.launcher == "accelerate":
            finals = [run_with_accelerate(pack[0], args.resume, args.num_processes)]
        else:
            finals = run_in_process(pack, args.resume, label=tag)
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


def dry_run(runs: list[StudyRun], args: argparse.Namespace, pack_size: int) -> None:
    """List the runs with their state, and estimate what is left to train from a probe per distinct setup:
    the measured FLOPs of a step (as the runs measure them) and the median time of a few steps."""
    print(f"{len(runs)} runs in {Path(runs[0].config.results_dir).parent.parent} (packs of up to {pack_size}):")
    total_seconds = total_flops = 0.0
    probes: dict[tuple[str, int], tuple[float, float]] = {}  # packs of one setup cost alike: probe each once
    for pack in pack_runs(runs, pack_size, lambda run: 0):
        setup = (setup_key(pack[0]), len(pack))
        if setup not in probes:
            probes[setup] = probe_steps(pack)
        flops_per_step, seconds_per_step = probes[setup]
        for run in pack:
            status = status_of(run) if (args.resume or args.overwrite) else "to do"
            status = "to do" if args.overwrite else status
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


def probe_steps(pack: list[StudyRun], steps: int = 3) -> tuple[float, float]:
    """(FLOPs per step per run, seconds per step per run) of a pack's setup, measured in memory on a copy
    of the pack (nothing is written): FLOPs as the runs count them, time as the median of a few steps."""
    with tempfile.TemporaryDirectory() as folder:
        probes = [dataclasses.replace(run.config, results_dir=str(Path(folder) / str(i))) for i, run in enumerate(pack)]
        task = create_dataset(probes[0])
        trainer = create_trainer(probes, create_diffusion_model(probes, task), task)
        trainer.measure_flops()
        times = []
        for _ in range(steps + 1):
            started = time.perf_counter()
            trainer.train_step()
            trainer.synchronize()
            times.append(time.perf_counter() - started)
        trainer.accelerator.free_memory()
        return trainer.flops_per_step, statistics.median(times[1:]) / len(pack)


def report(study: Study, study_dir: Path) -> None:
    from diffusion_lib.report import write_report

    records = [run.record() for run in study.runs]
    write_report(study_dir, records, title=f"Negative mining on matrix inversion: study '{study.name}'",
                 description=describe(study), primary=study.primary)
    print(f"report: {study_dir / 'report.md'}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_command_line(build_parser(), argv)
    try:
        return run_explaining_errors(run, args)
    except (TrainingInterrupted, RunStopped, KeyboardInterrupt, RunCrashed) as error:
        again = [a for a in argv if a not in ("--resume", "--overwrite")]
        stopped = "error" if isinstance(error, RunCrashed) else "interrupted"
        command = shlex.join(["python", str(Path(__file__).relative_to(ROOT)), *again, "--resume"])
        print(f"{stopped}: {str(error) or 'stopped'}; resume the study with: {command}", file=sys.stderr)
        if isinstance(error, RunCrashed):
            return 1
        return 128 + getattr(error, "signum", signal.SIGINT)


def run(args: argparse.Namespace) -> int:
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    if args.output is not None and not args.output.strip():
        raise ConfigError("--output '' is an empty path: name the study folder")
    if args.report_only is not None:  # rebuild from what the folder holds: its study.yaml and runs
        study_dir = Path(args.report_only or args.output or ROOT / "results" / load_study(args.config).name)
        study = StudyDir(study_dir).load()
        with StudyDir(study_dir).lock():  # one writer of the study's own files at a time
            report(study, study_dir)
        return 0
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
    study = select(load_study(args.config, parse_overrides(args.overrides)), args.strategies, args.seeds)
    study_dir = Path(args.output or ROOT / "results" / study.name)
    runs = expand(study, study_dir)
    selected = shard(runs, *parse_shard(args.shard)) if args.shard else runs
    if args.launcher == "inprocess" and len({run.config.device for run in runs}) > 1:
        raise ConfigError("runs on different devices need --launcher accelerate (one device per process)")
    pack_size = args.pack or default_pack_size(study, runs, args.launcher)
    check_model_packs(runs, pack_size)
    if not selected:
        print(f"shard {args.shard} has no runs (the study has {len(runs)})")
        return 0
    # refuse before training anything, not halfway through the study (and refuse a dry run alike)
    folder = StudyDir(study_dir)
    folder.check(study, resume=args.resume, overwrite=args.overwrite, sharded=bool(args.shard))
    for run in selected:
        RunDir(run.config.results_dir).check(run.config, resume=args.resume, overwrite=args.overwrite)
    if args.dry_run:
        dry_run(selected, args, pack_size)
        return 0
    folder.prepare(study, overwrite=args.overwrite)
    train_all(selected, args, pack_size)
    if args.shard:
        print(f"shard {args.shard} done; when every shard is, merge with: "
              f"python experiments/matrix_inversion_mining_comparison.py --report-only {shlex.quote(str(study_dir))}")
        return 0
    with folder.lock():
        report(study, study_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
