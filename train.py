"""Train one energy-diffusion model, from flags, a YAML file and `key=value` overrides.

    python train.py --dataset inverse --mining-strategy adversarial
    python train.py --config configs/runs/inverse.yaml mining.opt_steps=5 train.batch_size=512
    python train.py --config results/run/config.yaml --resume

Experiment scripts import `create_dataset`, `create_diffusion_model` and `create_trainer` from here.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
from typing import TYPE_CHECKING, Any, Sequence

# light modules only up here: --help must answer without loading torch; the rest is imported where used
from diffusion_lib.harness.build import create_dataset, create_diffusion_model, create_trainer
from diffusion_lib.harness.cli import OneLineParser, parse_bool, parse_command_line, run_explaining_errors
from diffusion_lib.harness.config import ConfigError, RunConfig, build_config, check_keys, flatten, load_yaml, parse_overrides
from diffusion_lib.harness.io import atomic_write_json
from diffusion_lib.harness.run_dir import RunDir, ScoringOutOfMemory, TrainingInterrupted, sampling_settings
from diffusion_lib.mining import STRATEGIES
from diffusion_lib.study.launch import LAUNCHED_BY_STUDY

if TYPE_CHECKING:
    from accelerate import Accelerator

    from diffusion_lib.diffusion import GaussianDiffusion1D
    from diffusion_lib.tasks.base import Task

__all__ = ["create_dataset", "create_diffusion_model", "create_trainer", "main"]


# flag -> config key; both spellings (--batch_size / --batch-size) are accepted
FLAGS: dict[str, tuple[str, type]] = {
    "dataset": ("task.dataset", str),
    "rank": ("task.rank", int),
    "mining-strategy": ("mining.strategy", str),
    "mining-opt-steps": ("mining.opt_steps", int),
    "mining-scale-factor": ("mining.scale_factor", float),
    "batch-size": ("train.batch_size", int),
    "train-steps": ("train.steps", int),
    "diffusion-steps": ("diffusion.timesteps", int),
    "eval-every": ("eval.every", int),
    "seed": ("seed", int),
    "device": ("device", str),
    "results-dir": ("results_dir", str),
}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="train.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--config", help="YAML file with any config keys (see README)")
    strategies = "; ".join(f"{name}: {s.description}" for name, s in STRATEGIES.items())
    for flag, (key, kind) in FLAGS.items():
        spellings = sorted({f"--{flag}", f"--{flag.replace('-', '_')}"})
        extra = f" ({strategies})" if key == "mining.strategy" else ""
        parser.add_argument(*spellings, dest=key, type=kind, default=None, help=f"sets {key}{extra}")
    parser.add_argument("--ood", dest="task.ood", type=parse_bool, nargs="?", const=True, default=None,
                        help="train on the harder (ood) distribution")
    parser.add_argument("--supervise-energy-landscape", "--supervise_energy_landscape", type=parse_bool, default=None,
                        help="reference flag: False -> mining.strategy none, True -> adversarial")
    parser.add_argument("--use-innerloop-opt", "--use_innerloop_opt", type=parse_bool, default=None,
                        help="reference flag: inference inner steps 5 (True) or 0 (False)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --results-dir from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="delete the run in --results-dir and start over")
    parser.add_argument("--evaluate", action="store_true", help="sample-only: score the latest checkpoint")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. train.steps=500")
    return parser


def _reference_flags(args: argparse.Namespace, layers: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Translate the reference code's two switches, unless the config already says the same thing."""
    layer: dict[str, Any] = {}
    explicit = {k: v for lay in layers for k, v in lay.items()}
    if args.supervise_energy_landscape is not None:
        wanted = "adversarial" if args.supervise_energy_landscape else "none"
        strategy = explicit.get("mining.strategy")
        if strategy is None:
            layer["mining.strategy"] = wanted
        elif (strategy == "none") == args.supervise_energy_landscape:
            raise ConfigError(
                f"--supervise-energy-landscape {args.supervise_energy_landscape} contradicts mining.strategy = {strategy!r}"
            )
    if args.use_innerloop_opt is not None and "diffusion.inference_steps" not in explicit:
        layer["diffusion.inference_steps"] = 5 if args.use_innerloop_opt else 0
    return layer


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """defaults < YAML < flags < key=value overrides, validated as one RunConfig."""
    file_layer: dict[str, Any] = {}
    if args.config is not None:  # --config '' is refused by load_yaml, not ignored
        file_layer = flatten(load_yaml(args.config))
        check_keys(file_layer, args.config)
    flag_layer = {key: getattr(args, key) for key, _ in FLAGS.values() if getattr(args, key) is not None}
    if getattr(args, "task.ood") is not None:
        flag_layer["task.ood"] = getattr(args, "task.ood")
    override_layer = parse_overrides(args.overrides)
    layers = [file_layer, flag_layer, override_layer]
    return build_config(*layers, _reference_flags(args, layers))


def run(args: argparse.Namespace) -> int:
    config = resolve_config(args)
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: continue the run, or start it over")
    if args.evaluate and args.overwrite:
        raise ConfigError("--evaluate only reads a run, so --overwrite (which starts it over) does not apply; "
                          "an evaluation may change only the sampling keys")
    from diffusion_lib.harness.trainer import make_accelerator

    accelerator = make_accelerator(config.device)
    if accelerator.is_main_process:
        print(f"# resolved config ({accelerator.device}, {accelerator.num_processes} process(es))\n{config.to_yaml()}")
    task = create_dataset(config)
    diffusion = create_diffusion_model(config, task)
    if args.evaluate:
        return evaluate(config, diffusion, task, accelerator)
    [final] = create_trainer(config, diffusion, task, resume=args.resume, overwrite=args.overwrite).train()
    if final.get("status") != "finished":
        if accelerator.is_main_process:
            print(f"error: {final.get('error')}", file=sys.stderr)
        return 1
    return 0


def evaluate(config: RunConfig, diffusion: GaussianDiffusion1D, task: Task, accelerator: Accelerator) -> int:
    """--evaluate: score the run's newest checkpoint (no trainer); print the result and keep it in the run's
    evaluations/ folder."""
    from diffusion_lib.harness.evaluate import evaluate_saved

    result = {"settings": sampling_settings(config), **evaluate_saved(config, diffusion, task, accelerator)}
    target = RunDir(config.results_dir).evaluation_file(config, result["step"])
    if accelerator.is_main_process:
        print(json.dumps(result, indent=2), flush=True)  # first: a folder that refuses the file keeps nothing
        atomic_write_json(target, result)
        print(f"evaluation: {target}")
    return 0


def resume_hint(args: argparse.Namespace, *overrides: str) -> str:
    """'; resume with: <command> [overrides]' for the run `args` name, if it has a folder to resume from."""
    if args.evaluate or os.environ.get(LAUNCHED_BY_STUDY):
        return ""
    try:
        run_dir = RunDir(resolve_config(args).results_dir)
    except Exception:  # bad input, or torch half-loaded by a stop while it loaded: no run to resume then
        return ""
    if not run_dir.config.exists():
        return ""
    return "; resume with: " + shlex.join(["python", "train.py", "--config", str(run_dir.config), "--resume", *overrides])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_command_line(build_parser(), sys.argv[1:] if argv is None else argv)
    try:
        return run_explaining_errors(run, args)
    except TrainingInterrupted as error:
        from accelerate import PartialState

        if PartialState().is_main_process:  # every process stops; one says so
            print(f"interrupted: {error}{resume_hint(args)}", file=sys.stderr)
        return 128 + error.signum
    except ScoringOutOfMemory as error:  # the run is trained: the advice scores it without deleting it
        print(f"error: {error}{resume_hint(args, f'eval.batch_size={error.smaller}')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as error:  # a second Ctrl-C, or a stop outside training (e.g. while carving puzzles)
        signal_name = f"{error}: " if str(error) else ""  # Stopped names its signal; a Ctrl-C is plain
        print(f"interrupted: {signal_name}stopped at once, without a checkpoint{resume_hint(args)}", file=sys.stderr)
        return 128 + getattr(error, "signum", signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
