"""Run configuration: plain nested dataclasses, YAML files, dotted `key=value` overrides, validation.

Resolution order: defaults < the task's defaults < YAML file < command-line flags < `key=value` overrides.
Every problem raises ConfigError with one line naming the key, value or file and what is allowed. Every
field is typed by an `Option` (registry.py), the schema the registries' options use too, and validated
once, in `build_config`: every float must be finite, and sizes have upper limits so that a typo is
refused instead of exhausting memory or time. `task`, `model` and `mining` are free-form maps, each
validated by its registry (tasks/base.py, models.py, mining.py) against its options.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from diffusion_lib.mining import STEP_SCHEDULES, STRATEGIES
from diffusion_lib.registry import Option, OptionError, brief_repr, coerce, int_in, one_of, suggest
from diffusion_lib.samplers import ANSWERS, resolve_sampler_config


class ConfigError(ValueError):
    """Bad user input: printed as one line, exit code 2."""


def _option(option: Option) -> Any:
    """A dataclass field whose type, default and check are `option`'s."""
    return field(default_factory=lambda: copy.copy(option.default), metadata={"option": option})


def _float(default: float, valid: Callable[[float], bool], requirement: str) -> Any:
    return _option(Option(float, default, valid, requirement))


def _positive_int(default: int) -> Any:
    return _option(Option(int, default, lambda v: v >= 1, "an int >= 1"))


def _ints(low: int, high: int, most: int, requirement: str) -> Any:
    """A list of at most `most` ints in [low, high], empty by default."""
    return _option(Option(list, [], lambda v: len(v) <= most and all(low <= n <= high for n in v), requirement, item=int))


PER_RUN_KEYS = ("seed", "results_dir")  # the keys in which runs of one pack (one batched model) may differ
TRACKERS = ("none", "tensorboard", "wandb")
DEVICES = ("auto", "cpu", "cuda", "mps")

# Upper limits on sizes: beyond them a run would exhaust memory or take days per step, so a larger value
# is a typo; refused in one line rather than ending in an allocator traceback or minutes of silence.
# (Limits of task, model and mining keys live in their registered options.)
MAX_TIMESTEPS = 1000  # every training step and every sample walks these
MAX_INNER_STEPS = 1000  # inner steps per timestep when sampling (each entry of the sweep too)
MAX_BATCH = 2**20  # a batch (training or sampling) and the held-out sets are held in memory
MAX_SWEEP_ENTRIES = 100  # eval.inference_steps_sweep: each entry is one more full evaluation at the end
MAX_CONFIG_BYTES = 1 << 20  # a config is a few lines; a bigger file is not one (or a device, read forever)
MAX_SAMPLERS = 8  # eval.samplers: each is one more scoring of every held-out set at the end
MAX_BEST_OF = 64  # eval.best_of: the largest N is N sampling passes of every held-out set at the end
MAX_RANKING_SCALES = 16
MAX_RANKING_SIGMA = 16  # noise scales past the answers' own range rank nothing the model could confuse


def _sampler_list(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, (list, tuple)) or len(value) > MAX_SAMPLERS:
        raise ValueError(f"must be a list of at most {MAX_SAMPLERS} samplers (names or maps)")
    return [resolve_sampler_config(v) for v in value]


@dataclass
class DiffusionConfig:
    timesteps: int = _option(int_in(1, MAX_TIMESTEPS, 10))
    inference_steps: int = _option(int_in(0, MAX_INNER_STEPS, 5))  # inner opt_steps per timestep
    inference_step_scale: float = _float(1.0, lambda v: v > 0, "a float > 0")
    # the published sampler's quirks, on request: steps after the first scaled by 2; answer sqrt(abar_0) x0
    inference_step_schedule: str = _option(one_of(*STEP_SCHEDULES))
    answer: str = _option(one_of(*ANSWERS))
    # the inference's inner steps (samplers.py): a name, or {name: ..., <its options>}; resolved to the map
    sampler: dict = _option(Option(dict, resolve_sampler_config(None), resolve=resolve_sampler_config))


@dataclass
class TrainConfig:
    steps: int = _option(int_in(1, 10**9, 100_000))  # at most: more than a lifetime of steps at any speed
    # > 0: train ceil(budget_flops / measured FLOPs per step) steps instead of `steps` (equal-compute runs)
    budget_flops: float = _float(0.0, lambda v: v >= 0, "a float >= 0 (0 = off)")
    batch_size: int = _option(int_in(1, MAX_BATCH, 2048))  # global: split evenly across accelerate processes
    lr: float = _float(1e-4, lambda v: v > 0, "a float > 0")
    # cosine: lr * (1 + cos(pi * step / steps)) / 2, set from the step (so a resume needs no state)
    lr_decay: str = _option(one_of("constant", "cosine"))
    adam_betas: list[float] = _option(
        Option(list, [0.9, 0.99], lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two floats in [0, 1)", item=float)
    )
    grad_clip: float = _float(1.0, lambda v: v > 0, "a float > 0")
    ema_decay: float = _float(0.995, lambda v: 0 < v < 1, "a float in (0, 1)")
    ema_every: int = _positive_int(10)
    # EMA warm-up (ema-pytorch's schedule, as the reference runs): a copy until this step, then
    # decay min(ema_decay, 1 - (1 + steps since)^-ema_power)
    ema_update_after_step: int = _option(Option(int, 100, lambda v: v >= 0, "an int >= 0"))
    ema_power: float = _float(2 / 3, lambda v: v > 0, "a float > 0")
    matmul_precision: str = _option(one_of("highest", "high"))
    # live curves: the metrics.jsonl records also go to TensorBoard or W&B (diffusion_lib/tracking.py)
    log_with: str = _option(one_of(*TRACKERS))
    log_every: int = _positive_int(100)
    save_every: int = _positive_int(1000)
    keep_checkpoints: int = _positive_int(2)


@dataclass
class EvalConfig:
    every: int = _positive_int(1000)
    # each held-out set is made once (cached); a Sudoku one is carved, the cost the limit's text states
    num_samples: int = _option(Option(int, 1024, lambda v: 1 <= v <= MAX_BATCH, f"an int in [1, {MAX_BATCH}]; a "
                                      "Sudoku set is carved once, ~0.4 s a puzzle on a CPU core for its three sets (an "
                                      "hour per 10 000): --dry-run estimates it"))
    batch_size: int = _option(int_in(1, MAX_BATCH, 1024))
    # after training: held-out MSE of the EMA model for each number of inference inner steps
    inference_steps_sweep: list[int] = _ints(
        0, MAX_INNER_STEPS, MAX_SWEEP_ENTRIES, f"a list of at most {MAX_SWEEP_ENTRIES} ints in [0, {MAX_INNER_STEPS}]"
    )
    # the energy landscape (harness/evaluate.py), scored at the end only when asked for (each costs scoring time):
    # best-of-N for each N (energy pick vs random pick vs oracle among N samples from N start noises)
    best_of: list[int] = _ints(1, MAX_BEST_OF, MAX_SWEEP_ENTRIES, f"a list of ints in [1, {MAX_BEST_OF}]")
    # ranking of the true answer against answer + sigma * noise for each sigma (and the model's own samples)
    ranking_scales: list[float] = _option(Option(
        list, [], lambda v: len(v) <= MAX_RANKING_SCALES and all(0 < s <= MAX_RANKING_SIGMA for s in v),
        f"a list of at most {MAX_RANKING_SCALES} floats in (0, {MAX_RANKING_SIGMA}]", item=float,
    ))
    # the diffusion levels ranked at; empty: every level (below diffusion.timesteps: checked in build_config)
    ranking_levels: list[int] = _option(Option(
        list, [], lambda v: all(0 <= t < MAX_TIMESTEPS for t in v),
        "a list of diffusion levels (ints >= 0, below diffusion.timesteps)", item=int,
    ))
    # ranking and best-of-N on the first this many problems of each held-out set (0: all of them): they
    # sample each of their problems N + 1 times, EMA and raw, so a subset keeps a CPU study's scoring short
    landscape_samples: int = _option(int_in(0, MAX_BATCH, 0))
    # more samplers scored at the end like the configured one (metrics, inference-steps sweep, best-of-N)
    samplers: list = _option(Option(list, [], resolve=_sampler_list))


@dataclass
class RunConfig:
    task: dict = field(default_factory=lambda: {"dataset": "inverse"})  # see tasks/base.py
    model: dict = field(default_factory=lambda: {"name": "mlp"})  # see models.py
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    mining: dict = field(default_factory=lambda: {"strategy": "adversarial"})  # see mining.py
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = _option(Option(int, 0, lambda v: 0 <= v < 2**63, "an int in [0, 2**63)"))
    device: str = _option(one_of(*DEVICES))
    results_dir: str = _option(Option(str, "results/run", lambda v: v.strip() != "", "a folder path"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# -- reading and merging ------------------------------------------------------------------------------
_SECTIONS = {"diffusion": DiffusionConfig, "train": TrainConfig, "eval": EvalConfig}
MAPS = ("task", "model", "mining")  # free-form maps, each resolved by its registry


def _known_keys() -> dict[str, dataclasses.Field]:
    """Every dotted key a config may set, with its dataclass field (sections themselves included)."""
    keys = {}
    for f in dataclasses.fields(RunConfig):
        keys[f.name] = f
        if f.name in _SECTIONS:
            keys.update({f"{f.name}.{g.name}": g for g in dataclasses.fields(_SECTIONS[f.name])})
    return keys


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'steps': 5}} -> {'train.steps': 5}; a free-form map (MAPS) gives one level of keys."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if (dotted in _SECTIONS or dotted in MAPS) and value is None:  # an empty section in a YAML file
            continue
        if isinstance(value, Mapping) and dotted in _SECTIONS:
            flat.update(flatten(value, dotted + "."))
        elif isinstance(value, Mapping) and dotted in MAPS:
            flat.update({f"{dotted}.{k}": v for k, v in value.items()})
        else:
            flat[dotted] = value
    return flat


def check_keys(flat: Mapping[str, Any], source: str) -> None:
    """Refuse unknown keys, naming the closest valid one. Keys of MAPS are checked by their registries."""
    allowed = [k for k in _ALL_KEYS if k not in _SECTIONS and k not in MAPS]
    for key in flat:
        if key.partition(".")[0] in MAPS and "." in key or key in allowed:
            continue
        if key in _SECTIONS or key in MAPS:  # `train: 5`, `mining: random`: a section given a value
            raise ConfigError(f"config key '{key}' in {source} is a section: give it a mapping of its keys, "
                              f"or set one key as {key}.<key>")
        raise ConfigError(f"unknown config key '{key}' in {source}{suggest(key, allowed)}")


class _DuplicateKey(yaml.MarkedYAMLError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last, silently)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, yaml.Node] = {}
            merges = [key_node for key_node, _ in node.value if key_node.tag == "tag:yaml.org,2002:merge"]
            if len(merges) > 1:  # YAML keeps one of them, silently; several merge as `<<: [*a, *b]`
                raise _DuplicateKey("merge key '<<' first given", merges[0].start_mark, "given again", merges[1].start_mark)
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # '<<' merges may override: that is their point
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in first:
                        raise _DuplicateKey(
                            f"key {brief_repr(key)} first set", first[key].start_mark, "set again", key_node.start_mark
                        )
                    first[key] = key_node
                except TypeError:  # an unhashable key: SafeLoader says so itself
                    continue
        return super().construct_mapping(node, deep=deep)


def _plain_number(construct: Callable[[yaml.SafeLoader, yaml.Node], Any]) -> Callable[[yaml.SafeLoader, yaml.Node], Any]:
    """A YAML 1.1 number constructor that refuses the base-60 (`1:30` = 90) and octal (`010` = 8) forms,
    which read as numbers nobody meant."""

    def constructed(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        value = construct(loader, node)
        text = node.value.replace("_", "").lstrip("+-")
        base = "base-60" if ":" in text else "octal" if re.fullmatch(r"0[0-7]+", text) else None
        if base is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value!r} reads as the {base} number {value} in YAML 1.1; quote it if it is "
                f"text, or write {value}", node.start_mark)
        return value

    return constructed


for _tag, _construct in (("int", yaml.SafeLoader.construct_yaml_int), ("float", yaml.SafeLoader.construct_yaml_float)):
    _StrictLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _plain_number(_construct))


def _kind_of(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a plain file"


def _read_config_file(path: Path) -> str:
    """The text of a regular file of at most MAX_CONFIG_BYTES, never blocking on a pipe or reading a device."""
    try:
        # O_NONBLOCK: opening a named pipe does not wait for a writer (it is refused just below)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' not found") from None
    except OSError as error:
        raise ConfigError(f"config file '{path}' is unreadable: {error.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ConfigError(f"config file '{path}' is unreadable: it is {_kind_of(mode)}, not a regular file")
    with os.fdopen(fd, "rb") as handle:
        try:
            data = handle.read(MAX_CONFIG_BYTES + 1)
        except OSError as error:
            raise ConfigError(f"config file '{path}' is unreadable: {error.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file '{path}' is larger than {MAX_CONFIG_BYTES // 2**20} MiB: not a config")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{path}' is unreadable: it is not UTF-8 text") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, turning every failure into a one-line ConfigError naming the file."""
    if not str(path).strip():  # Path('') would mean the current folder
        raise ConfigError("config file '' is an empty path: name a YAML file")
    path = Path(path)
    text = _read_config_file(path)
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except _DuplicateKey as error:
        raise ConfigError(
            f"duplicate key in {path}:{error.problem_mark.line + 1}: {error.context} at line "
            f"{error.context_mark.line + 1}; give each key once"
        ) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(error, "problem", None) or "malformed YAML"
        raise ConfigError(f"malformed YAML in {where}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"malformed YAML in {path}: nested too deeply") from None
    except ValueError as error:  # a value YAML reads but Python refuses, e.g. an int of 5000 digits
        raise ConfigError(f"malformed YAML in {path}: {str(error).split(';')[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, not {type(data).__name__}")
    return data


def parse_value(text: str) -> Any:
    """Parse an override's value as YAML; '1e-4' (a string to YAML 1.1) becomes a float."""
    try:
        value = yaml.load(text, Loader=_StrictLoader)
    except (yaml.YAMLError, RecursionError, ValueError):
        return text
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate `key=value` overrides from the other arguments wherever they stand, so an option
    taking several values (`--seeds 0 1 train.steps=5`) cannot swallow them."""
    rest, overrides = [], []
    for item in argv:
        # a dotted key, then '=': a path such as runs/x__mining.opt_steps=5/config.yaml is not one
        (overrides if _OVERRIDE.match(item) else rest).append(item)
    return rest, overrides


def parse_overrides(items: list[str]) -> dict[str, Any]:
    flat = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. train.steps=500)")
        check_keys({key.strip(): None}, f"override '{item}'")
        flat[key.strip()] = parse_value(value.strip())
    return flat


# -- validation ----------------------------------------------------------------------------------------
_PROBLEMS = {  # what a config key's message says of each problem an option finds
    "type": "has the wrong type: expected {type_name}",
    "range": "is out of range: must be {requirement}",
    "finite": "is not a finite number",
    "resolve": "is invalid: {why}",
}


def _checked(key: str, value: Any) -> Any:
    """The value of config key `key`, coerced and checked by its field's option; ConfigError in one line."""
    option = _ALL_KEYS[key].metadata["option"]
    try:
        return coerce(option, value)
    except OptionError as error:
        shown = error.value if error.problem == "finite" else brief_repr(error.value)
        type_name = option.kind.__name__ + (f"[{option.item.__name__}]" if option.item else "")  # list[float]
        problem = _PROBLEMS[error.problem].format(type_name=type_name, requirement=option.requirement, why=error)
        raise ConfigError(f"config key '{key}' = {shown} {problem}") from None


def build_config(*layers: Mapping[str, Any]) -> RunConfig:
    """Merge layers (dotted or nested keys) over the defaults and the task's defaults, validate every value
    (the maps through their registries), return a RunConfig."""
    given: dict[str, Any] = {}
    for layer in layers:
        layer = flatten(layer)
        check_keys(layer, "the config")
        given.update(layer)
    maps: dict[str, dict[str, Any]] = {name: {} for name in MAPS}
    maps["mining"]["strategy"] = "adversarial"
    merged = {k: v for k, v in flatten(RunConfig().to_dict()).items() if k.partition(".")[0] not in MAPS}
    for key, value in {**_task_defaults(given), **given}.items():  # the task's defaults under the user's values
        name, _, sub = key.partition(".")
        if name in MAPS:
            maps[name][sub] = value
        else:
            merged[key] = value
    sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    top: dict[str, Any] = {}
    for key, value in merged.items():
        value = _checked(key, value)
        section, _, name = key.rpartition(".")
        (sections[section] if section else top)[name] = value
    config = RunConfig(**{name: cls(**sections[name]) for name, cls in _SECTIONS.items()}, **_resolve_maps(maps), **top)
    _check_levels(config)
    return config


def _check_levels(config: RunConfig) -> None:
    """Keys whose range depends on another key (a task's options: its `check`)."""
    from diffusion_lib.tasks.base import TASKS

    levels, timesteps = config.eval.ranking_levels, config.diffusion.timesteps
    if any(t >= timesteps for t in levels):
        raise ConfigError(f"config key 'eval.ranking_levels' = {levels} is out of range: levels must be below "
                          f"diffusion.timesteps = {timesteps}")
    if levels and not config.eval.ranking_scales:  # the levels say where to rank, the scales whether to
        raise ConfigError(f"config key 'eval.ranking_levels' = {levels} needs eval.ranking_scales: without "
                          "scales nothing is ranked")
    problem = TASKS[config.task["dataset"]].check(config.task)
    if problem:
        raise ConfigError(problem)


def _task_defaults(given: Mapping[str, Any]) -> dict[str, Any]:
    from diffusion_lib.tasks.base import task_defaults

    task = {k.partition(".")[2]: v for k, v in given.items() if k.startswith("task.")}
    try:
        return task_defaults(task)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _resolve_maps(maps: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each map validated by its registry (imported here: tasks and models need torch, --help does not)."""
    from diffusion_lib.models import MODELS
    from diffusion_lib.tasks.base import TASKS

    registries = {"task": TASKS, "model": MODELS, "mining": STRATEGIES}
    try:
        return {name: registries[name].resolve(values) for name, values in maps.items()}
    except ValueError as error:
        raise ConfigError(str(error)) from None


def config_from_file(path: str | Path) -> RunConfig:
    flat = flatten(load_yaml(path))
    check_keys(flat, str(path))
    return build_config(flat)


def config_differences(a: RunConfig, b: RunConfig, ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ between two configs (for resume / overwrite checks)."""
    flat_a, flat_b = flatten(a.to_dict()), flatten(b.to_dict())
    keys = sorted(set(flat_a) | set(flat_b))
    return [k for k in keys if k not in ignore and flat_a.get(k) != flat_b.get(k)]


_ALL_KEYS = _known_keys()
