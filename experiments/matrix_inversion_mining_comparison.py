"""Does adversarial negative mining help on matrix inversion? Every strategy x seed, then the report.

    python experiments/matrix_inversion_mining_comparison.py --config configs/quick.yaml
    python experiments/matrix_inversion_mining_comparison.py --config configs/quick.yaml --resume
    python experiments/matrix_inversion_mining_comparison.py --report-only results/quick

Runs are built with train.py's helpers and trained by Trainer1D; this script only orchestrates:
which runs, in which order, which to skip or resume, and the report at the end.
"""
from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# light modules only up here (--help answers without torch or matplotlib); the rest is imported where used
from diffusion_lib.config import RunConfig, parse_overrides  # noqa: E402
from diffusion_lib.dry_run import dry_run  # noqa: E402
from diffusion_lib.launch import (  # noqa: E402
    RunCrashed, RunStopped, check_devices, check_flags, check_model_packs, default_pack_size, train_all,
)
from diffusion_lib.results import RunDir, TrainingInterrupted  # noqa: E402
from diffusion_lib.study import StudyDir, expand, load_study, parse_shard, select, shard  # noqa: E402
from diffusion_lib.study_report import report  # noqa: E402
from train import (  # noqa: E402
    OneLineParser, create_dataset, create_diffusion_model, create_trainer, parse_command_line, run_explaining_errors,
)

if TYPE_CHECKING:
    from diffusion_lib.trainer import Trainer1D

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


def build_trainer(configs: list[RunConfig], **options: object) -> Trainer1D:
    """A pack's trainer, built as train.py builds a run's (options: create_trainer's resume=, label=)."""
    task = create_dataset(configs[0])
    return create_trainer(configs, create_diffusion_model(configs, task), task, **options)


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
    check_model_packs(runs, pack_size)
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
        return 0
    folder.prepare(study, overwrite=args.overwrite)
    train_all(selected, pack_size, build_trainer, resume=args.resume, launcher=args.launcher,
              num_processes=args.num_processes)
    if args.shard:
        print(f"shard {args.shard} done; when every shard is, merge with: "
              f"python experiments/matrix_inversion_mining_comparison.py --report-only {shlex.quote(str(study_dir))}")
        return 0
    with folder.lock():
        return report(study, study_dir)


if __name__ == "__main__":
    sys.exit(main())
