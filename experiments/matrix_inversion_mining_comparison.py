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
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusion_lib.config import ConfigError, parse_overrides  # noqa: E402
from diffusion_lib.mining import mining_strategy  # noqa: E402
from diffusion_lib.report import write_report  # noqa: E402
from diffusion_lib.study import Study, StudyDir, StudyRun, expand, load_study, parse_shard, select, shard  # noqa: E402
from diffusion_lib.results import RunDir  # noqa: E402
from diffusion_lib.trainer import RunDiverged, TrainingInterrupted  # noqa: E402
from train import (  # noqa: E402
    OneLineParser, create_dataset, create_diffusion_model, create_trainer, parse_command_line, run_explaining_errors,
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
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of the base run config")
    return parser


def describe(study: Study) -> str:
    config = study.runs[0].config
    lines = [
        study.description.strip(),
        f"Task: {config.task.dataset}, rank {config.task.rank}{' (trained on ood)' if config.task.ood else ''}; "
        f"{config.train.steps} steps of batch {config.train.batch_size}, lr {config.train.lr}, "
        f"{config.diffusion.timesteps} diffusion steps, hidden {config.model.hidden_dim}; "
        f"held-out sets of {config.eval.num_samples} problems; seeds {study.seeds}.",
        "Strategies: " + "; ".join(f"**{label}** = {mining}" for label, mining in study.strategies.items()) + ".",
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


def run_in_process(run: StudyRun, resume: bool) -> dict:
    task = create_dataset(run.config)
    trainer = create_trainer(run.config, create_diffusion_model(run.config, task), task, resume=resume)
    try:
        return trainer.train()
    finally:
        trainer.accelerator.free_memory()  # the accelerator outlives the run: drop its references to it


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
        launched.append(subprocess.Popen(command, cwd=ROOT, start_new_session=True))
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


def train_all(runs: list[StudyRun], args: argparse.Namespace) -> None:
    durations: list[float] = []
    for i, run in enumerate(runs, 1):
        tag = f"[{i}/{len(runs)}] {run.run_id}"
        status = status_of(run)
        if status in ("finished", "failed") and args.resume:
            print(f"{tag}: already {status}, skipped")
            continue
        eta = f", ETA {format_seconds(statistics.mean(durations) * (len(runs) - i + 1))}" if durations else ""
        print(f"{tag}: starting ({run.strategy}, seed {run.seed}{eta})", flush=True)
        started = time.perf_counter()
        try:  # with --resume, a run that never reached a checkpoint starts over inside its folder
            if args.launcher == "accelerate":
                final = run_with_accelerate(run, args.resume, args.num_processes)
            else:
                final = run_in_process(run, args.resume)
        except RunDiverged as error:  # the run is marked failed in its final.json; the study goes on
            print(f"{tag}: FAILED: {error}", flush=True)
            continue
        durations.append(time.perf_counter() - started)
        if final.get("status") == "finished":
            print(f"{tag}: done in {format_seconds(durations[-1])}, MSE in-dist {final['mse_id']:.4g}, "
                  f"ood {final['mse_ood']:.4g}", flush=True)
        else:
            print(f"{tag}: FAILED: {final.get('error')}", flush=True)


def dry_run(study: Study, runs: list[StudyRun]) -> None:
    """List the runs with their state, and estimate their cost from a few timed steps per distinct setup."""
    print(f"{len(runs)} runs in {Path(runs[0].config.results_dir).parent.parent}:")
    seconds_per_step: dict[str, float] = {}
    total_seconds = total_evals = 0.0
    for run in runs:
        key = json.dumps({k: v for k, v in run.config.to_dict().items() if k not in ("seed", "results_dir")})
        if key not in seconds_per_step:
            seconds_per_step[key] = time_steps(run)
        status = status_of(run)
        remaining = run.config.train.steps if status == "to do" else 0
        evals = remaining * run.config.train.batch_size * (1 + mining_strategy(run.config.mining).cost(run.config.mining))
        total_seconds += remaining * seconds_per_step[key]
        total_evals += evals
        print(f"  {run.run_id:<48} {status:<9} {run.config.train.steps} steps, "
              f"~{format_seconds(remaining * seconds_per_step[key])} training")
    print(f"estimated cost: ~{format_seconds(total_seconds)} of training on this machine "
          f"(validation extra), {total_evals:.3g} energy-gradient evaluations")


def time_steps(run: StudyRun, steps: int = 3) -> float:
    """Median seconds of a few training steps of this run's setup, in memory (nothing is written)."""
    with tempfile.TemporaryDirectory() as folder:
        probe = dataclasses.replace(run.config, results_dir=folder)
        task = create_dataset(probe)
        trainer = create_trainer(probe, create_diffusion_model(probe, task), task)
        times = []
        for _ in range(steps + 1):
            started = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - started)
        trainer.accelerator.free_memory()
        return statistics.median(times[1:])


def report(study: Study, study_dir: Path) -> None:
    records = [run.record() for run in study.runs]
    write_report(study_dir, records, title=f"Negative mining on matrix inversion: study '{study.name}'",
                 description=describe(study))
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
    if args.shard and args.overwrite:
        raise ConfigError("--overwrite with --shard would delete the other shards' runs; overwrite without --shard first")
    study = select(load_study(args.config, parse_overrides(args.overrides)), args.strategies, args.seeds)
    study_dir = Path(args.output or ROOT / "results" / study.name)
    runs = expand(study, study_dir)
    selected = shard(runs, *parse_shard(args.shard)) if args.shard else runs
    if args.launcher == "inprocess" and len({run.config.device for run in runs}) > 1:
        raise ConfigError("runs on different devices need --launcher accelerate (one device per process)")
    if not selected:
        print(f"shard {args.shard} has no runs (the study has {len(runs)})")
        return 0
    if args.dry_run:
        dry_run(study, selected)
        return 0
    folder = StudyDir(study_dir)
    folder.check(study, resume=args.resume, overwrite=args.overwrite, sharded=bool(args.shard))
    if not args.resume and not args.overwrite:
        for run in selected:  # refuse before training anything, not halfway through the study
            RunDir(run.config.results_dir).check(run.config, resume=False, overwrite=False)
    folder.prepare(study, overwrite=args.overwrite)
    train_all(selected, args)
    if args.shard:
        print(f"shard {args.shard} done; when every shard is, merge with: "
              f"python experiments/matrix_inversion_mining_comparison.py --report-only {shlex.quote(str(study_dir))}")
        return 0
    with folder.lock():
        report(study, study_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
