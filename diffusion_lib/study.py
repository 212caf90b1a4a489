"""A study: a base run config, a map of mining strategies, seeds and a sweep, expanded into runs.

The YAML holds `name`, `description`, `seeds`, `strategies` (label -> mining_config), `sweep`
(dotted key -> list of values; their cartesian product) and, beside them, any run-config keys
(task, model, diffusion, mining, train, eval, device), which form the base of every run.
"""
from __future__ import annotations

import itertools
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .config import ConfigError, RunConfig, flatten, build_config, check_keys, load_yaml
from .results import RunDir, RunRecord
from .utils import atomic_write_text

STUDY_KEYS = ("name", "description", "seeds", "strategies", "sweep")


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

    def to_dict(self) -> dict[str, Any]:
        """The resolved study, as saved in study.yaml (and compared on --resume)."""
        return {
            "name": self.name,
            "description": self.description,
            "seeds": self.seeds,
            "strategies": self.strategies,
            "sweep": self.sweep,
            "base": self.base,
            "overrides": self.overrides,
        }


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def parse_study(data: dict[str, Any], source: str, overrides: dict[str, Any] | None = None) -> Study:
    """Validate a study mapping (e.g. a YAML file's content) and the dotted overrides for its base."""
    study = {k: data[k] for k in STUDY_KEYS if k in data}
    base = flatten({k: v for k, v in data.items() if k not in STUDY_KEYS})
    check_keys(base, source)
    base.pop("results_dir", None)  # every run's folder is set by the study

    name = study.get("name", Path(source).stem)
    _require(isinstance(name, str) and re.fullmatch(r"[\w.-]+", name) is not None,
             f"study key 'name' = {name!r} in {source} must be a folder name (letters, digits, _ . -)")
    seeds = study.get("seeds", [0])
    _require(isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds),
             f"study key 'seeds' = {seeds!r} in {source} must be a non-empty list of ints >= 0")
    _require(len(set(seeds)) == len(seeds), f"study key 'seeds' = {seeds!r} in {source} repeats a seed")
    strategies = study.get("strategies", {"none": {"strategy": "none"}, "random": {"strategy": "random"},
                                          "adversarial": {"strategy": "adversarial"}})
    _require(isinstance(strategies, dict) and strategies and all(isinstance(v, dict) for v in strategies.values()),
             f"study key 'strategies' in {source} must map labels to mining_config mappings")
    sweep = study.get("sweep") or {}
    _require(isinstance(sweep, dict), f"study key 'sweep' in {source} must map dotted config keys to lists")
    for key, values in sweep.items():
        check_keys({key: None}, f"{source} (sweep)")
        _require(isinstance(values, list) and values, f"sweep key '{key}' in {source} must map to a non-empty list")
    description = study.get("description", "")
    _require(isinstance(description, str), f"study key 'description' in {source} must be text")
    overrides = dict(overrides or {})
    for key in overrides:  # what the study itself varies cannot be overridden for all runs at once
        _require(key not in ("seed", "results_dir"), f"override '{key}' is set per run by the study; use --seeds / --output")
        _require(key != "mining.strategy", "override 'mining.strategy' would make every strategy the same; use --strategies")
        _require(key not in sweep, f"override '{key}' is swept by {source}; edit its sweep instead")
    return Study(name, description, seeds, strategies, sweep, base, overrides, source)


def _merge(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """child over parent; nested run-config sections merge, `strategies`, `sweep` and `seeds` replace."""
    merged = dict(parent)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key not in ("strategies", "sweep"):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_study_file(path: str | Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A study YAML, with `extends: other.yaml` (relative to the file) merged underneath."""
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
    return _merge(inherited, data)


def load_study(path: str | Path, overrides: dict[str, Any] | None = None) -> Study:
    return parse_study(read_study_file(path), str(path), overrides)


def select(study: Study, strategies: list[str] | None, seeds: list[int] | None) -> Study:
    """Restrict a study to some strategy labels and/or replace its seeds (command-line filters)."""
    if strategies:
        for label in strategies:
            _require(label in study.strategies, f"unknown strategy {label!r}; this study has: {', '.join(study.strategies)}")
        study.strategies = {s: study.strategies[s] for s in strategies}
    if seeds:
        study.seeds = list(dict.fromkeys(seeds))
    return study


def _slug(value: Any) -> str:
    return re.sub(r"[^\w.+-]", "-", str(value))


def expand(study: Study, study_dir: Path) -> list[StudyRun]:
    """Every (seed, sweep point, strategy) run, with its validated config; seed-major, so early runs
    already give one seed of every comparison."""
    base_mining = {k.split(".", 1)[1]: v for k, v in study.base.items() if k.startswith("mining.")}
    base = {k: v for k, v in study.base.items() if not k.startswith("mining.")}
    keys = list(study.sweep)
    runs = []
    for seed in study.seeds:
        for values in itertools.product(*(study.sweep[k] for k in keys)):
            point = dict(zip(keys, values))
            for label, mining in study.strategies.items():
                run_id = "__".join([_slug(label), *(f"{k}={_slug(v)}" for k, v in point.items()), f"seed{seed}"])
                layer = {**base, **{f"mining.{k}": v for k, v in {**base_mining, **mining}.items()}}
                layer.update(point)
                layer.update(study.overrides)
                layer.update(seed=seed, results_dir=str(study_dir / "runs" / run_id))
                try:
                    config = build_config(layer)
                except ConfigError as error:
                    raise ConfigError(f"{study.source}, run {run_id}: {error}") from None
                runs.append(StudyRun(run_id, label, point, seed, config))
    study.runs = runs
    return runs


def pack_runs(runs: list[StudyRun], size: int, state: Callable[[StudyRun], Any]) -> list[list[StudyRun]]:
    """The runs in packs of up to `size` that may train as one batched model (Trainer1D): the same config
    but for seed and folder, and the same `state` (the step they resume from). Packs are ordered by their
    first run, so packs of one keep the runs' (seed-major) order."""
    groups: dict[tuple[str, Any], list[StudyRun]] = {}
    for run in runs:
        shared = {k: v for k, v in flatten(run.config.to_dict()).items() if k not in ("seed", "results_dir")}
        groups.setdefault((json.dumps(shared, sort_keys=True, default=str), state(run)), []).append(run)
    packs = [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]
    return sorted(packs, key=lambda pack: runs.index(pack[0]))


def parse_shard(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text)
    _require(match is not None, f"--shard {text!r} must look like I/N with 0 <= I < N (e.g. 0/3)")
    index, count = int(match.group(1)), int(match.group(2))
    _require(0 <= index < count, f"--shard {text!r} must have 0 <= I < N")
    return index, count


def shard(runs: list[StudyRun], index: int, count: int) -> list[StudyRun]:
    """The index-th of `count` disjoint, deterministic slices (round robin, so slices cost alike)."""
    return runs[index::count]


class StudyDir:
    """A study's folder: study.yaml, runs/<run_id>/, summary.csv, summary.json, report.md, plots/."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.study_file = self.root / "study.yaml"

    def saved(self) -> dict[str, Any] | None:
        return load_yaml(self.study_file) if self.study_file.exists() else None

    def check(self, study: Study, *, resume: bool, overwrite: bool, sharded: bool) -> None:
        """Refuse to mix two different studies in one folder, or to redo one without --resume."""
        saved = self.saved()
        if saved is None or overwrite:
            return
        if saved != study.to_dict():
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

    def prepare(self, study: Study, overwrite: bool) -> None:
        if overwrite:
            for name in ("study.yaml", "runs", "summary.csv", "summary.json", "report.md", "plots"):
                path = self.root / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.study_file, yaml.safe_dump(study.to_dict(), sort_keys=False))

    def load(self) -> Study:
        saved = self.saved()
        if saved is None:
            raise ConfigError(f"'{self.root}' is not a study folder: it has no study.yaml")
        study = Study(**saved, source=str(self.study_file))
        expand(study, self.root)
        return study
