"""Train one energy-diffusion model, from flags, a YAML file and `key=value` overrides.

    python train.py --dataset inverse --mining-strategy adversarial
    python train.py --config configs/inverse.yaml mining.opt_steps=5 train.batch_size=512
    python train.py --config results/run/config.yaml --resume

Experiment scripts import `create_dataset`, `create_diffusion_model` and `create_trainer` from here.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import TYPE_CHECKING, Any, Callable, Sequence

# light modules only up here: --help must answer without loading torch; the rest is imported where used
from diffusion_lib.config import (
    ConfigError, RunConfig, build_config, check_keys, flatten, load_yaml, parse_overrides, split_overrides,
)
from diffusion_lib.files import atomic_write_json, describe_os_error
from diffusion_lib.launch import LAUNCHED_BY_STUDY
from diffusion_lib.locks import EXIT_BUSY, FolderBusy
from diffusion_lib.mining import STRATEGIES
from diffusion_lib.results import RunDir, TrainingInterrupted, sampling_settings

if TYPE_CHECKING:
    from diffusion_lib.diffusion import GaussianDiffusion1D
    from diffusion_lib.tasks import Task
    from diffusion_lib.trainer import Trainer1D


# -- the helpers every script builds runs with ------------------------------------------------------
def create_dataset(config: RunConfig) -> Task:
    """The task `config.task` names (tasks.TASKS)."""
    from diffusion_lib.tasks import make_task

    return make_task(config.task)


def create_diffusion_model(config: RunConfig | Sequence[RunConfig], task: Task) -> GaussianDiffusion1D:
    """The model for one run, or for a pack of runs (configs differing only in seed and folder); a model
    that does not pack refuses more than one run in one line."""
    from diffusion_lib.diffusion import GaussianDiffusion1D
    from diffusion_lib.models import build_model

    configs = [config] if isinstance(config, RunConfig) else list(config)
    try:
        model = build_model(configs[0].model, task, runs=len(configs))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    for run, run_config in enumerate(configs):
        model.ebm.init_run(run, run_config.seed)  # the seed fixes the initial weights
    settings = configs[0].diffusion
    return GaussianDiffusion1D(
        model,
        timesteps=settings.timesteps,
        mining_config=configs[0].mining,
        inference_steps=settings.inference_steps,
        inference_step_scale=settings.inference_step_scale,
        inference_step_schedule=settings.inference_step_schedule,
        answer=settings.answer,
        data_bound=task.answer_bound,
        sampler=settings.sampler,
        corrupt=task.corrupt,
    )


def create_trainer(
    config: RunConfig | Sequence[RunConfig],
    diffusion: GaussianDiffusion1D,
    task: Task,
    *,
    resume: bool = False,
    overwrite: bool = False,
    evaluate_only: bool = False,
    label: str = "",
) -> Trainer1D:
    from diffusion_lib.trainer import Trainer1D, make_accelerator

    first = config if isinstance(config, RunConfig) else config[0]
    return Trainer1D(
        diffusion, task, config, make_accelerator(first.device),
        resume=resume, overwrite=overwrite, evaluate_only=evaluate_only, label=label,
    )


# -- command line -----------------------------------------------------------------------------------
class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line on stderr, exit code 2 (argparse prints the usage too)
        print(f"error: {message} (see python {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


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
    from diffusion_lib.trainer import make_accelerator

    accelerator = make_accelerator(config.device)
    if accelerator.is_main_process:
        print(f"# resolved config ({accelerator.device}, {accelerator.num_processes} process(es))\n{config.to_yaml()}")
    task = create_dataset(config)
    diffusion = create_diffusion_model(config, task)
    trainer = create_trainer(config, diffusion, task, resume=args.resume, overwrite=args.overwrite,
                             evaluate_only=args.evaluate)
    if args.evaluate:
        result = {"settings": sampling_settings(config), **trainer.evaluate_saved()}
        target = trainer.runs[0].dir.evaluation_file(config, result["step"])
        if accelerator.is_main_process:
            print(json.dumps(result, indent=2), flush=True)  # first: a folder that refuses the file keeps nothing
            atomic_write_json(target, result)
            print(f"evaluation: {target}")
        return 0
    [final] = trainer.train()
    if final.get("status") != "finished":
        if accelerator.is_main_process:
            print(f"error: {final.get('error')}", file=sys.stderr)
        return 1
    return 0


def parse_command_line(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse flags, collecting every `key=value` into args.overrides wherever it stands."""
    rest, overrides = split_overrides(list(argv))
    args = parser.parse_args(rest)
    args.overrides += overrides
    return args


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` is the allocator giving up (CUDA's OutOfMemoryError, the CPU allocator's, or the
    dynamic loader failing to map a library)."""
    torch = sys.modules.get("torch")  # not imported here: loading torch may be what ran out of memory
    kinds = (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))
    return isinstance(error, kinds) or any(text in str(error) for text in ("can't allocate memory", "failed to map segment"))


def _while_importing(error: BaseException) -> bool:
    """Whether `error` was raised while Python loaded a module (its traceback passes through importlib)."""
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        tb = tb.tb_next
    return isinstance(error, ImportError)


def _memory_advice(error: BaseException) -> str:
    """The one line for memory running out: what ran out, while doing what, and what to change."""
    what = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    if _while_importing(error):
        return (f"out of memory while loading Python modules ({type(error).__name__}: {what}); this process may not "
                "use enough memory to load torch: raise its limit (ulimit -v) or free memory")
    return f"out of memory ({what}); lower model.hidden_dim, train.batch_size or eval.batch_size"


def run_explaining_errors(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """run(args); what the user can act on becomes one line on stderr (with --debug, the traceback):
    bad input (ConfigError) exit code 2; a folder another process holds (FolderBusy) EXIT_BUSY (75);
    the OS saying no (a full disk, a read-only folder, a file in the way) or memory running out, exit code 1."""
    try:
        return run(args)
    except (ConfigError, FolderBusy) as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BUSY if isinstance(error, FolderBusy) else 2
    except OSError as error:
        if args.debug:
            raise
        print(f"error: {describe_os_error(error)}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError, ImportError) as error:
        if args.debug or not out_of_memory(error):
            raise
        print(f"error: {_memory_advice(error)}", file=sys.stderr)
        return 1


def resume_hint(args: argparse.Namespace) -> str:
    """'; resume with: <command>' for the run `args` name, if it has a folder to resume from."""
    if args.evaluate or os.environ.get(LAUNCHED_BY_STUDY):
        return ""
    try:
        run_dir = RunDir(resolve_config(args).results_dir)
    except ConfigError:
        return ""
    if not run_dir.config.exists():
        return ""
    return "; resume with: " + shlex.join(["python", "train.py", "--config", str(run_dir.config), "--resume"])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_command_line(build_parser(), sys.argv[1:] if argv is None else argv)
    try:
        return run_explaining_errors(run, args)
    except TrainingInterrupted as error:
        from accelerate import PartialState

        if PartialState().is_main_process:  # every process stops; one says so
            print(f"interrupted: {error}{resume_hint(args)}", file=sys.stderr)
        return 128 + error.signum
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside training (e.g. while scoring)
        print(f"interrupted: stopped at once, without a checkpoint{resume_hint(args)}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
