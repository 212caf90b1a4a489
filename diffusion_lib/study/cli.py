"""Does adversarial negative mining help on matrix inversion? Every strategy x seed, then the report.

The study command (experiments/matrix_inversion_mining_comparison.py runs it): which runs, in which order, which
to skip or resume, and the report at the end; runs are built with harness.build's helpers and trained by Trainer1D.
"""
from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path

import re

import yaml

# light modules only up here (--help answers without torch or matplotlib); the rest is imported where used
from diffusion_lib.harness.build import build_trainer
from diffusion_lib.harness.cli import OneLineParser, parse_command_line, run_explaining_errors
from diffusion_lib.harness.config import parse_overrides
from diffusion_lib.harness.run_dir import RunDir, ScoringOutOfMemory, TrainingInterrupted
from diffusion_lib.mining import STRATEGIES
from diffusion_lib.study.launch import (
    RunCrashed, RunStopped, check_devices, check_flags, check_runs, default_pack_size, dry_run, train_all,
)
from diffusion_lib.study.spec import Study, StudyDir, StudyRun, expand, load_study, parse_shard, select, shard

ROOT = Path(__file__).resolve().parents[2]  # the checkout: configs/ and results/ are read and written there
SCRIPT = "experiments/matrix_inversion_mining_comparison.py"

DEFAULT_CONFIG = ROOT / "configs" / "studies" / "matrix_inversion_mining.yaml"


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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_command_line(build_parser(), argv)
    try:
        return run_explaining_errors(run, args)
    except (TrainingInterrupted, RunStopped, KeyboardInterrupt, RunCrashed, ScoringOutOfMemory) as error:
        failed = isinstance(error, (RunCrashed, ScoringOutOfMemory))
        again = [a for a in argv if a not in ("--resume", "--overwrite")]
        if isinstance(error, ScoringOutOfMemory):  # the trained runs are scored again, fewer problems at once
            again = [a for a in again if not a.startswith("eval.batch_size=")] + [f"eval.batch_size={error.smaller}"]
        command = shlex.join(["python", SCRIPT, *again, "--resume"])
        print(f"{'error' if failed else 'interrupted'}: {str(error) or 'stopped'}; resume the study with: {command}",
              file=sys.stderr)
        if failed:
            return 1
        return 128 + getattr(error, "signum", signal.SIGINT)


def run(args: argparse.Namespace) -> int:
    check_flags(args)
    if args.report_only is not None:  # rebuild from what the folder holds: its study.yaml and runs
        study_dir = Path(args.report_only or args.output or ROOT / "results" / load_study(args.config).name)
        study = StudyDir(study_dir).load()
        with StudyDir(study_dir).lock():  # one writer of the study's own files at a time
            return report(study, study_dir)
    study = select(load_study(args.config, parse_overrides(args.overrides)), args.strategies, args.seeds)
    study_dir = Path(args.output or ROOT / "results" / study.name)
    runs = expand(study, study_dir)
    selected = shard(runs, *parse_shard(args.shard)) if args.shard else runs
    check_devices(runs, args.launcher)
    pack_size = args.pack or default_pack_size(study, runs, args.launcher)
    check_runs(runs, pack_size)
    if not selected:
        print(f"shard {args.shard} has no runs (the study has {len(runs)})")
        return 0
    # refuse before training anything, not halfway through the study (and refuse a dry run alike)
    folder = StudyDir(study_dir)
    folder.check(study, resume=args.resume, overwrite=args.overwrite, sharded=bool(args.shard))
    for run in selected:
        # the study's --overwrite would start every run over: the advice names the one run to fix
        RunDir(run.config.results_dir).check(run.config, resume=args.resume, overwrite=args.overwrite, start_over=None)
    if args.dry_run:
        dry_run(selected, pack_size, build_trainer, resume=args.resume, overwrite=args.overwrite)
        print(*pilot_lines(study, runs), sep="\n")
        return 0
    folder.prepare(study, overwrite=args.overwrite)
    train_all(selected, pack_size, build_trainer, resume=args.resume, launcher=args.launcher,
              num_processes=args.num_processes)
    if args.shard:
        print(f"shard {args.shard} done; when every shard is, merge with: "
              f"python {SCRIPT} --report-only {shlex.quote(str(study_dir))}")
        return 0
    with folder.lock():
        return report(study, study_dir)


def pilot_lines(study: Study, runs: list[StudyRun]) -> list[str]:
    """Where the folder already holds finished runs (a pilot): the seeds the primary comparison needs, from
    the observed spread of its per-seed differences, to detect its margin (or the observed effect)."""
    if study.primary is None:
        return []
    from diffusion_lib.report.analysis import analyse  # numpy and scipy: not needed to answer --help

    records = [run.record() for run in runs]
    if not any(record.finished for record in records):
        return []
    analysis = analyse(records, study.primary)
    margin = analysis.primary.margin if analysis.primary else None
    lines = []
    for c in (c for c in analysis.primary_comparisons if c.refused is None):
        effect = c.margin_units(margin) if margin is not None else abs(c.diff)
        words = f"a difference of {margin}" if margin is not None else f"the observed effect ({abs(c.diff):.3g})"
        needed = c.seeds_needed(effect)
        lines.append(f"pilot: {c.a} vs {c.b}, {c.score.metric}_{c.score.set} ({c.score.basis}), {c.n_a} pairs in "
                     f"{study.name}'s folder: seeds needed to detect {words} at 80 % power: "
                     f"{needed if needed is not None else 'more than 10 000, or unknown (needs a paired test)'}")
    return lines


# -- the report ------------------------------------------------------------------------------------
def describe(study: Study) -> str:
    """The report's description: the study file's text (unless it names strategies this study does not
    run, e.g. after --strategies), then what was actually run: every task, the rest from the first run's
    resolved config."""
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
    tasks = dict.fromkeys(f"{run.config.task['dataset']} ({_keys(run.config.task, 'dataset')})" for run in study.runs)
    lines = [
        text,
        f"Strategies ({len(flow)}): " + "; ".join(f"`{label}: {mining}`" for label, mining in flow.items()) + ".",
        f"Task{'s' if len(tasks) > 1 else ''}: {'; '.join(tasks)}; model {config.model['name']} "
        f"({_keys(config.model, 'name')}); {length} of batch {config.train.batch_size}, lr {config.train.lr}, "
        f"{config.diffusion.timesteps} diffusion steps, {config.diffusion.inference_steps} inner steps per step "
        f"when sampling; held-out sets of {config.eval.num_samples} problems; seeds {', '.join(map(str, study.seeds))}.",
    ]
    if study.sweep:
        lines.append("Sweep: " + "; ".join(f"{key} in {values}" for key, values in study.sweep.items()) + ".")
    return "\n\n".join(line for line in lines if line)


def _keys(options: dict, skip: str) -> str:
    """'rank 20, ood False': a resolved task or model map's keys but its name."""
    return ", ".join(f"{key} {value}" for key, value in options.items() if key != skip)


def report(study: Study, study_dir: Path) -> int:
    """Write the study's report.md (tables and plots) from its runs' records, and say where; the exit
    code: 1 when no run finished (the report then has no result)."""
    from diffusion_lib.report.markdown import write_report
    from diffusion_lib.tasks.base import task_title  # torch: not needed to answer --help

    records = [run.record() for run in study.runs]
    tasks = ", ".join(dict.fromkeys(task_title(run.config.task) for run in study.runs))
    write_report(study_dir, records, title=f"Negative mining on {tasks}: study '{study.name}'",
                 description=describe(study), primary=study.primary)
    print(f"report: {study_dir / 'report.md'}")
    if not any(record.finished for record in records):
        print(f"error: no run of the study finished ({', '.join(sorted({r.status for r in records}))}); "
              f"see {study_dir / 'report.md'}", file=sys.stderr)
        return 1
    return 0
