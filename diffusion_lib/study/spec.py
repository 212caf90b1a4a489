"""A study: a base run config, a map of mining strategies, seeds and a sweep, expanded into runs.

The YAML holds `name`, `description`, `seeds`, `strategies` (label -> mining_config), `sweep`
(dotted key -> list of values; their cartesian product), optionally `primary` ({compare: [A, B],
metric: <metric>_<set>}, e.g. mse_id: the comparison the study is for; <metric> one of the task's) and,
beside them, any run-config keys (task, model, diffusion, mining, train, eval, device), which form the
base of every run.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from diffusion_lib.harness.config import PER_RUN_KEYS, ConfigError, RunConfig, flatten, build_config, check_keys, load_yaml
from diffusion_lib.harness.io import FolderLock, atomic_write_text, check_folder, remove_temp_files, slug, writing
from diffusion_lib.harness.run_dir import RunDir, RunRecord
from diffusion_lib.registry import brief_repr

STUDY_KEYS = ("name", "description", "seeds", "strategies", "sweep", "primary")
# the study sets these per run (from `seeds`, the folder, `strategies`): sweeping them would mislabel runs
SET_BY_THE_STUDY = {"seed": "seeds", "results_dir": "--output", "mining.strategy": "strategies"}  # key -> its option
MAX_SEEDS = 1000  # seeds of one study; more is a typo (range(10**6)) that would take minutes to expand
MAX_RUNS = 10_000  # runs of one study (seeds x sweep points x strategies), each one folder and one training


@dataclass
class StudyRun:
    run_id: str
    strategy: str  # the study's label for this mining setting
    sweep: dict[str, Any]
    seed: int
    config: RunConfig

    def record(self) -> RunRecord:
        return RunRecord.from_run_dir(RunDir(self.config.results_dir), self.run_id, self.strategy, self.sweep, self.seed)


@dataclass
class Study:
    name: str
    description: str
    seeds: list[int]
    strategies: dict[str, dict[str, Any]]
    sweep: dict[str, list[Any]]
    base: dict[str, Any]  # flat dotted run-config keys
    overrides: dict[str, Any] = field(default_factory=dict)  # command-line key=value: applied last, to every run
    source: str = "<study>"
    runs: list[StudyRun] = field(default_factory=list)
    primary: dict[str, Any] | None = None  # {"compare": [A, B], "metric": "<metric>_<set>"}

    def to_dict(self) -> dict[str, Any]:
        """The resolved study, as saved in study.yaml (and, without `primary`, compared on --resume)."""
        return {
            "name": self.name,
            "description": self.description,
            "seeds": self.seeds,
            "strategies": self.strategies,
            "sweep": self.sweep,
            "base": self.base,
            "overrides": self.overrides,
            "primary": self.primary,
        }


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_seeds(seeds: Any, where: str) -> list[int]:
    _require(isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds),
             f"{where} = {brief_repr(seeds)} must be a non-empty list of ints >= 0")
    _require(len(seeds) <= MAX_SEEDS, f"{where} lists {len(seeds)} seeds: at most {MAX_SEEDS}")
    _require(len(set(seeds)) == len(seeds), f"{where} = {brief_repr(seeds)} repeats a seed")
    return seeds


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _check_sweep(sweep: Any, source: str) -> dict[str, list[Any]]:
    _require(isinstance(sweep, dict), f"study key 'sweep' in {source} must map dotted config keys to lists")
    for key, values in sweep.items():
        _require(isinstance(key, str), f"sweep key {brief_repr(key)} in {source} must be a dotted config key")
        check_keys({key: None}, f"{source} (sweep)")
        _require(key not in SET_BY_THE_STUDY,
                 f"sweep key '{key}' in {source} is set per run by the study; use its '{SET_BY_THE_STUDY.get(key)}' instead")
        _require(isinstance(values, list) and values, f"sweep key '{key}' in {source} must map to a non-empty list")
        for value in values:  # a run's folder is named after its values: no nested structures
            _require(_is_scalar(value) or (isinstance(value, list) and all(map(_is_scalar, value))),
                     f"sweep key '{key}' in {source}: value {brief_repr(value)} must be a number, text or a flat list")
        seen: set[str] = set()
        for value in values:
            _require(json.dumps(value) not in seen, f"sweep key '{key}' in {source} lists the value {brief_repr(value)} twice")
            seen.add(json.dumps(value))
    return sweep


def _check_primary(primary: Any, strategies: dict[str, Any], source: str) -> dict[str, Any] | None:
    """`primary: {compare: [A, B], metric: <metric>_<set>}`: two of the study's labels and a score name (its
    metric is checked against the runs' tasks by `expand`, its set when the report is built)."""
    if primary is None:
        return None
    where = f"study key 'primary' in {source}"
    _require(isinstance(primary, dict), f"{where} must be a mapping: {{compare: [A, B], metric: mse_id}}")
    for key in ("compare", "metric"):
        _require(key in primary, f"{where} lacks '{key}': write {{compare: [A, B], metric: mse_id}}")
    extra = [key for key in primary if key not in ("compare", "metric", "margin")]
    _require(not extra, f"{where} has unknown key {brief_repr(extra[0]) if extra else ''}; allowed: compare, metric, "
             "margin")
    compare, metric = primary["compare"], primary["metric"]
    _require(isinstance(compare, list) and len(compare) == 2 and all(isinstance(label, str) for label in compare)
             and compare[0] != compare[1],
             f"{where}: compare = {brief_repr(compare)} must list two different strategy labels")
    for label in compare:
        _require(label in strategies, f"{where}: {label!r} is not a strategy of this study ({', '.join(strategies)})")
    _require(isinstance(metric, str) and re.fullmatch(r"\w+_\w+", metric) is not None,
             f"{where}: metric = {brief_repr(metric)} must be <metric>_<held-out set>, e.g. mse_id")
    checked = {"compare": list(compare), "metric": metric}
    if "margin" in primary:
        checked["margin"] = _check_margin(primary["margin"], where)
    return checked


def _check_margin(margin: Any, where: str) -> float | str:
    """An equivalence margin: a number > 0 (the metric's units) or 'N%' (N > 0, relative to B's mean)."""
    relative = isinstance(margin, str) and re.fullmatch(r"\s*(\d+(\.\d*)?|\.\d+)\s*%\s*", margin)
    ok = (relative and float(margin.strip().rstrip("%")) > 0) or (
        isinstance(margin, (int, float)) and not isinstance(margin, bool) and math.isfinite(margin) and margin > 0)
    _require(bool(ok), f"{where}: margin = {brief_repr(margin)} must be a number > 0 (the metric's units) or a "
             "percentage of B such as '2%'")
    return margin.strip() if relative else float(margin)


def task_metric_names(task: Mapping[str, Any]) -> list[str]:
    """The metric names of a run's task: the one place a study asks a task what it measures (tasks.make_task
    on the run's resolved `task` config; building a task sets its options, its data is drawn later)."""
    from diffusion_lib.tasks.base import make_task

    return [metric.name for metric in make_task(task).metrics]


def _check_metrics(study: Study, runs: list[StudyRun]) -> None:
    """Every run's task measures the same metrics (the report judges every group by one headline metric), and
    the primary's <metric> is one of them (a study may sweep the task)."""
    tasks = {run.config.task["dataset"]: run.config.task for run in runs}  # a task's metrics are its class's
    names = {dataset: task_metric_names(task) for dataset, task in tasks.items()}
    _require(len({tuple(n) for n in names.values()}) == 1,
             f"{study.source}: its runs' tasks measure different metrics ("
             + "; ".join(f"{task}: {', '.join(n)}" for task, n in names.items())
             + "), and one report judges every group by one headline metric: run one study per task")
    if study.primary is not None:
        name, metrics = study.primary["metric"], next(iter(names.values()))
        _require(any(name.startswith(f"{metric}_") for metric in metrics),
                 f"study key 'primary' in {study.source}: metric = {name!r} must be <metric>_<held-out set> with "
                 f"<metric> one of {', '.join(metrics)} (the metrics of task {next(iter(names))!r})")


def parse_study(data: dict[str, Any], source: str, overrides: dict[str, Any] | None = None) -> Study:
    """Validate a study mapping (e.g. a YAML file's content) and the dotted overrides for its base."""
    study = {k: data[k] for k in STUDY_KEYS if k in data}
    base = flatten({k: v for k, v in data.items() if k not in STUDY_KEYS})
    check_keys(base, source)
    for key in ("seed", "results_dir"):  # set per run: a base value would be silently replaced
        _require(key not in base, f"key '{key}' in {source} is set per run by the study; use its "
                                  f"'{SET_BY_THE_STUDY[key]}' instead")

    name = study.get("name", Path(source).stem)
    # '.' and '..' are no folder of their own: results/.. is the repository, which --overwrite would clear
    _require(isinstance(name, str) and re.fullmatch(r"[\w.-]+", name) is not None and name not in (".", ".."),
             f"study key 'name' = {brief_repr(name)} in {source} must be a folder name (letters, digits, _ . -; "
             "not . or ..)")
    seeds = _check_seeds(study.get("seeds", [0]), f"study key 'seeds' in {source}")
    strategies = study.get("strategies", {"none": {"strategy": "none"}, "random": {"strategy": "random"},
                                          "adversarial": {"strategy": "adversarial"}})
    _require(isinstance(strategies, dict) and strategies and all(isinstance(v, dict) for v in strategies.values()),
             f"study key 'strategies' in {source} must map labels to mining_config mappings")
    for label in strategies:
        _require(isinstance(label, str) and label.strip() != "",
                 f"strategy label {brief_repr(label)} in {source} must be non-empty text (quote it in YAML)")
    sweep = _check_sweep(study.get("sweep") or {}, source)
    description = study.get("description", "")
    _require(isinstance(description, str), f"study key 'description' in {source} must be text")
    primary = _check_primary(study.get("primary"), strategies, source)
    overrides = dict(overrides or {})
    check_keys(flatten(overrides), f"{source} (overrides)")
    for key in overrides:  # what the study itself varies cannot be overridden for all runs at once
        _require(key not in ("seed", "results_dir"), f"override '{key}' is set per run by the study; use --seeds / --output")
        _require(key != "mining.strategy", "override 'mining.strategy' would make every strategy the same; use --strategies")
        _require(key not in sweep, f"override '{key}' is swept by {source}; edit its sweep instead")
    return Study(name, description, seeds, strategies, sweep, base, overrides, source, primary=primary)


def _merge(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """child over parent; nested run-config sections merge, `strategies`, `sweep`, `primary`, `seeds` replace."""
    merged = dict(parent)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key not in ("strategies", "sweep", "primary"):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_study_file(path: str | Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A study YAML, with `extends: other.yaml` (relative to the file) merged underneath."""
    _require(str(path).strip() != "", "study file '' is an empty path: name a YAML file")
    path = Path(path)
    _require(path.resolve() not in seen, f"study file {path} extends itself (through {', '.join(map(str, seen))})")
    data = load_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    _require(isinstance(parent, str), f"study key 'extends' in {path} must be a file name")
    inherited = read_study_file(path.parent / parent, (*seen, path.resolve()))
    for own in ("name", "description"):  # these belong to the file that says them
        inherited.pop(own, None)
    if "strategies" in data and "primary" not in data:  # a primary names labels: it goes with its strategies
        inherited.pop("primary", None)
    return _merge(inherited, data)


def load_study(path: str | Path, overrides: dict[str, Any] | None = None) -> Study:
    return parse_study(read_study_file(path), str(path), overrides)


def select(study: Study, strategies: list[str] | None, seeds: list[int] | None) -> Study:
    """Restrict a study to some strategy labels and/or replace its seeds (command-line filters)."""
    if strategies:
        for label in strategies:
            _require(label in study.strategies, f"unknown strategy {label!r}; this study has: {', '.join(study.strategies)}")
        study.strategies = {s: study.strategies[s] for s in strategies}
        if study.primary is not None and not set(study.primary["compare"]) <= set(study.strategies):
            study.primary = None  # its comparison is no longer in the study
    if seeds:
        study.seeds = _check_seeds(list(dict.fromkeys(seeds)), "--seeds")
    return study


@dataclass(frozen=True)
class _Claim:
    """Which run of a study took a folder or a setting: its label, seed and sweep point (by position)."""

    label: str
    seed: int
    index: int
    point: dict[str, Any] = field(compare=False)

    def versus(self, other: _Claim) -> str:
        """What tells the two runs apart: 'strategy labels 'x' and 'y'' or 'sweep values 1 and 1.0 of 'k''."""
        if self.label != other.label:
            return f"strategy labels {self.label!r} and {other.label!r}"
        for key, value in self.point.items():
            if json.dumps(value) != json.dumps(other.point[key]):
                return f"sweep values {brief_repr(value)} and {brief_repr(other.point[key])} of '{key}'"
        return f"seeds {self.seed} and {other.seed} of strategy {self.label!r}"


def _name_limits(folder: Path) -> tuple[int, int]:
    """(longest file name, longest path), in bytes, on the file system that holds or will hold `folder`."""
    existing = next((p for p in (folder, *folder.parents) if os.path.isdir(p)), Path.cwd())  # False on errors
    try:
        return os.pathconf(existing, "PC_NAME_MAX"), os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError):  # a file system that does not say: the common limits
        return 255, 4096


# the longest path a run writes below its folder: an atomic write's temp file for a checkpoint
_LONGEST_INSIDE_A_RUN = "/checkpoints/.step-000000000.pt.abcdefgh.tmp"


def _check_folder_length(folder: Path, limits: tuple[int, int], what: str) -> None:
    """Refuse, before anything trains, a folder the file system would refuse ('File name too long')."""
    name_max, path_max = limits
    for part in folder.parts:
        _require(len(part.encode()) <= name_max, f"{what}: the folder name {brief_repr(part)} is "
                 f"{len(part.encode())} bytes, longer than the file system allows ({name_max})")
    length = len(str(folder.absolute()).encode()) + len(_LONGEST_INSIDE_A_RUN)
    _require(length <= path_max, f"{what}: paths in its folder {brief_repr(str(folder))} would be {length} bytes, "
                                 f"longer than the file system allows ({path_max})")


def expand(study: Study, study_dir: Path) -> list[StudyRun]:
    """Every (seed, sweep point, strategy) run, with its validated config; seed-major, so early runs
    already give one seed of every comparison. Refuses two runs that would share a folder, or two sweep
    points of one strategy that resolve to the same run (each would be counted as a separate result)."""
    count = len(study.seeds) * len(study.strategies) * math.prod(len(values) for values in study.sweep.values())
    _require(count <= MAX_RUNS, f"{study.source} makes {count} runs (seeds x sweep points x strategies): at most {MAX_RUNS}")
    base_mining = {k.split(".", 1)[1]: v for k, v in study.base.items() if k.startswith("mining.")}
    base = {k: v for k, v in study.base.items() if not k.startswith("mining.")}
    keys = list(study.sweep)
    limits = _name_limits(study_dir)
    runs = []
    folders: dict[str, _Claim] = {}  # run folder, case-folded (some file systems ignore case) -> its run
    settings: dict[str, _Claim] = {}  # resolved config, folder aside -> its run
    for seed in study.seeds:
        for index, values in enumerate(itertools.product(*(study.sweep[k] for k in keys))):
            point = dict(zip(keys, values))
            for label, mining in study.strategies.items():
                run_id = "__".join([slug(label), *(f"{k}={slug(v)}" for k, v in point.items()), f"seed{seed}"])
                claim = _Claim(label, seed, index, point)
                _check_folder_length(study_dir / "runs" / run_id, limits,
                                     f"{study.source}, run {brief_repr(run_id)} (shorten its strategy label or sweep values)")
                other = folders.setdefault(run_id.casefold(), claim)
                if other != claim:
                    raise ConfigError(
                        f"{other.versus(claim)} in {study.source} map to the same run folder '{run_id}' "
                        "(folder names keep letters, digits and _ . + -, and may ignore case); make them differ there"
                    )
                layer = {**base, **{f"mining.{k}": v for k, v in {**base_mining, **mining}.items()}}
                layer.update(point)
                layer.update(study.overrides)
                layer.update(seed=seed, results_dir=str(study_dir / "runs" / run_id))
                try:
                    config = build_config(layer)
                except ConfigError as error:
                    raise ConfigError(f"{study.source}, run {run_id}: {error}") from None
                other = settings.setdefault(json.dumps({**config.to_dict(), "results_dir": None}, sort_keys=True), claim)
                if other.label == label and other != claim:
                    raise ConfigError(
                        f"{other.versus(claim)} in {study.source} give the same run of strategy {label!r}; "
                        "list each setting once"
                    )
                runs.append(StudyRun(run_id, label, point, seed, config))
    _check_metrics(study, runs)
    study.runs = runs
    return runs


def setup_key(run: StudyRun) -> str:
    """A run's config but for its seed and folder: runs with equal keys may share a pack (and a cost)."""
    shared = {k: v for k, v in flatten(run.config.to_dict()).items() if k not in PER_RUN_KEYS}
    return json.dumps(shared, sort_keys=True, default=str)


def pack_runs(runs: list[StudyRun], size: int, state: Callable[[StudyRun], Any]) -> list[list[StudyRun]]:
    """The runs in packs of up to `size` that may train as one batched model (Trainer1D): the same config
    but for seed and folder, and the same `state` (the step they resume from). Packs are ordered by their
    first run, so packs of one keep the runs' (seed-major) order."""
    groups: dict[tuple[str, Any], list[StudyRun]] = {}
    for run in runs:
        groups.setdefault((setup_key(run), state(run)), []).append(run)
    packs = [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]
    return sorted(packs, key=lambda pack: runs.index(pack[0]))


def parse_shard(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text)
    _require(match is not None, f"--shard {text!r} must look like I/N with 0 <= I < N (e.g. 0/3)")
    index, count = int(match.group(1)), int(match.group(2))
    _require(0 <= index < count, f"--shard {text!r} must have 0 <= I < N")
    return index, count


def shard(runs: list[StudyRun], index: int, count: int) -> list[StudyRun]:
    """The index-th of `count` disjoint, deterministic slices that cost alike: each setup's runs (its seeds)
    are dealt round robin over the slices, each setup starting one slice further on. (Dealing the seed-major
    run list itself would give every slice one strategy when there are as many slices as strategies.)"""
    setups: dict[str, int] = {}
    dealt: dict[str, int] = {}
    chosen = []
    for run in runs:
        key = setup_key(run)
        offset = setups.setdefault(key, len(setups))
        position = dealt.get(key, 0)
        dealt[key] = position + 1
        if (offset + position) % count == index:
            chosen.append(run)
    return chosen


class StudyDir:
    """A study's folder: study.yaml, runs/<run_id>/, summary.csv, summary.json, report.md, plots/."""

    SAVED_KEYS = ("name", "description", "seeds", "strategies", "sweep", "base", "overrides", "primary")

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.study_file = self.root / "study.yaml"

    def saved(self) -> Study | None:
        """The study its study.yaml describes, with its runs (None if there is none); validated like a
        study file, so a damaged one is refused in one line naming the file and the key."""
        if not self.study_file.exists():
            return None
        source = str(self.study_file)
        saved = load_yaml(self.study_file)
        for key in self.SAVED_KEYS:
            _require(key in saved, f"{source} is damaged: it lacks key '{key}'")
        for key in saved:
            _require(key in self.SAVED_KEYS, f"{source} is damaged: unknown key {brief_repr(key)}")
        for key in ("base", "overrides"):
            _require(isinstance(saved[key], dict), f"{source} is damaged: key '{key}' must map config keys to values")
        check_keys(flatten(saved["base"]), f"{source} (base)")  # so that no base key passes for a study key
        own = {key: saved[key] for key in STUDY_KEYS}
        study = parse_study({**own, **saved["base"]}, source, saved["overrides"])
        expand(study, self.root)  # validates every run's config
        return study

    def check(self, study: Study, *, resume: bool, overwrite: bool, sharded: bool) -> None:
        """Refuse to mix two different studies in one folder, or to redo one without --resume; and a folder
        that cannot be made (a file or a broken link in the way), so that a dry run refuses it too."""
        check_folder(self.root)
        saved = self.saved()
        if saved is None or overwrite:
            return
        if _identity(saved) != _identity(study):
            raise ConfigError(
                f"study folder '{self.root}' holds a different study (see its study.yaml); "
                "use another --output or --overwrite"
            )
        # parallel shards of one study share the folder; anything else needs an explicit --resume
        if not (resume or sharded):
            raise ConfigError(
                f"study folder '{self.root}' already holds this study; pass --resume to continue it, "
                "--report-only to rebuild its report, or --overwrite to start over"
            )

    def lock(self) -> FolderLock:
        """Hold `<study>/.lock` (waiting for it) while writing the study's own files: study.yaml, summaries,
        report, plots; then delete temp files a killed writer left among them. Runs have their own locks."""
        lock = FolderLock(self.root).acquire(wait=True)
        remove_temp_files(self.root, self.root / "plots")
        return lock

    def prepare(self, study: Study, overwrite: bool) -> None:
        with self.lock(), contextlib.ExitStack() as run_locks:
            if overwrite:
                # a run another process is training must not vanish under it: take every run's lock first
                runs = self.root / "runs"
                for folder in sorted(runs.iterdir()) if runs.is_dir() else []:
                    if folder.is_dir():
                        run_locks.enter_context(RunDir(folder).lock())
                for name in ("study.yaml", "runs", "summary.csv", "summary.json", "report.md", "plots"):
                    path = self.root / name
                    with writing(path):
                        if path.is_dir():
                            shutil.rmtree(path)
                        elif path.exists():
                            path.unlink()
            atomic_write_text(self.study_file, yaml.safe_dump(study.to_dict(), sort_keys=False))

    def load(self) -> Study:
        study = self.saved()
        if study is None:
            raise ConfigError(f"'{self.root}' is not a study folder: it has no study.yaml")
        return study


def _identity(study: Study) -> dict[str, Any]:
    """What makes two studies the same: everything but `primary`, which only chooses the report's headline,
    and `eval.batch_size`, which only sets how many problems are sampled at once (memory, not results)."""
    same = {key: value for key, value in study.to_dict().items() if key != "primary"}
    for layer in ("base", "overrides"):
        same[layer] = {k: v for k, v in flatten(same[layer]).items() if k != "eval.batch_size"}
    return same
