"""What a run writes and where: resolved config (headed by the code that wrote it), metrics log, checkpoints,
final results (`Final`, final.json's one definition)."""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, get_type_hints

import numpy as np
import yaml

from diffusion_lib.harness.checkpoint import newest_verified_step
from diffusion_lib.harness.config import ConfigError, RunConfig, config_differences, config_from_file, flatten
from diffusion_lib.harness.io import (
    FolderBusy, FolderLock, append_line, atomic_write_json, atomic_write_text, make_folder, remove_temp_files, slug,
    writing,
)
from diffusion_lib.samplers import sampler_label

# keys a resumed run may change: where it runs, where it writes, how long it trains, and how many problems
# it samples at once (memory only: a run that ran out of it while scoring is scored again with fewer)
RESUMABLE_CHANGES = ("device", "results_dir", "train.steps", "eval.batch_size")
# what scoring a saved model (--evaluate) may change besides: how it samples and on how many problems
SAMPLING_KEYS = ("diffusion.inference_steps", "diffusion.inference_step_scale", "diffusion.inference_step_schedule",
                 "diffusion.answer", "diffusion.sampler", "eval.num_samples", "eval.inference_steps_sweep",
                 "eval.best_of", "eval.ranking_scales", "eval.ranking_levels", "eval.landscape_samples",
                 "eval.samplers")
EVALUATION_CHANGES = (*RESUMABLE_CHANGES, *SAMPLING_KEYS, "eval.every")


MAX_EVALUATION_NAME = 200  # characters of changed settings in an evaluation's file name (file systems allow 255 bytes)


def sampling_settings(config: RunConfig) -> dict[str, Any]:
    """The settings an evaluation samples with (recorded with its result)."""
    flat = flatten(config.to_dict())
    return {key: flat[key] for key in SAMPLING_KEYS}


def _setting_text(value: Any) -> str:
    """A sampling setting in a file name: a list joined by '-', a sampler by its label."""
    if isinstance(value, dict):
        return sampler_label(value)
    return "-".join(map(_setting_text, value)) if isinstance(value, list) else str(value)


# -- which code made a run: the project's git commit and whether its tracked files had uncommitted changes ---
ROOT = Path(__file__).resolve().parents[2]  # the project's folder: the checkout whose commit is recorded
GIT_TIMEOUT_S = 5  # a hung git (a network file system, a lock) must not hold up a run


def code_version(root: Path | None = None) -> dict[str, Any]:
    """{"git_commit": <sha>, "git_dirty": <tracked files differ from it>} of the project's checkout, or {}
    where there is none (a tarball, a repository git refuses or that has no commit), or {"git_error": why}
    where a checkout's commit could not be read (git not installed, or hung).

    One `git status` call. Only a checkout rooted at the project's folder counts: a project unpacked
    inside some other repository (a home folder under git) is not that repository's code. Untracked
    files do not make the tree dirty: runs write results/ there, which is not code."""
    root = ROOT if root is None else root
    if not (root / ".git").exists():  # a folder (a clone) or a file (a worktree)
        return {}
    try:
        done = subprocess.run(["git", "-C", str(root), "status", "--porcelain=v2", "--branch", "--untracked-files=no"],
                              capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return {"git_error": "git is not on PATH" if isinstance(error, FileNotFoundError) else f"git failed: {error}"}
    lines = done.stdout.splitlines()
    commit = next((line.split()[2] for line in lines if line.startswith("# branch.oid ")), None)
    if done.returncode != 0 or commit is None or commit == "(initial)":
        return {}
    return {"git_commit": commit, "git_dirty": any(not line.startswith("#") for line in lines)}


def code_comment(code: dict[str, Any]) -> str:
    """A YAML comment line naming the code (config.yaml's first line), or '' where there is no checkout."""
    if "git_commit" not in code:
        return f"# the code's git commit is unknown: {code['git_error']}\n" if code else ""
    return f"# written by the code at git commit {code['git_commit']}{' with uncommitted changes' if code['git_dirty'] else ''}\n"


class RunLocked(FolderBusy):
    """Another live process is training or evaluating this run (it holds the run folder's lock)."""

    message = ("run folder '{folder}' is in use by {holder}, which is training or evaluating it; "
               "wait until it ends or stop it")


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived while training; every run of the pack has a checkpoint at `step`."""

    def __init__(self, step: int, signum: int, run_dirs: list[RunDir]):
        self.step, self.signum, self.run_dirs = step, signum, run_dirs
        folders = ", ".join(str(d.checkpoints) for d in run_dirs)
        super().__init__(f"{signal.Signals(signum).name} at step {step}: checkpoint saved in {folders}")


class ScoringOutOfMemory(Exception):
    """Memory ran out while the trained runs were scored; each has its checkpoint at `step`, so a resume
    with `eval.batch_size` = `smaller` scores them without training again."""

    def __init__(self, step: int, batch_size: int, run_dirs: list[RunDir], cause: BaseException):
        self.smaller = batch_size // 2
        folders = ", ".join(str(d.checkpoints) for d in run_dirs)
        super().__init__(f"out of memory while scoring step {step} at eval.batch_size = {batch_size} "
                         f"({str(cause).strip()[:200] or type(cause).__name__}); checkpoint saved in {folders}")


class RunDir:
    """One run's folder: config.yaml, metrics.jsonl, checkpoints/, final.json, evaluations/, tensorboard/."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.metrics = self.root / "metrics.jsonl"
        self.checkpoints = self.root / "checkpoints"
        self.final = self.root / "final.json"
        self.evaluations = self.root / "evaluations"
        self.tensorboard = self.root / "tensorboard"  # written by trainer.RunTracker

    def _run_files(self) -> list[Path]:
        """Everything a run wrote (what --overwrite deletes)."""
        paths = (self.config, self.metrics, self.checkpoints, self.final, self.evaluations, self.tensorboard)
        return [p for p in paths if p.exists()]

    def saved_config(self) -> RunConfig | None:
        return config_from_file(self.config) if self.config.exists() else None

    def lock(self, optional: bool = False) -> FolderLock:
        """Become the run's only writer: hold `<run>/.lock` (holding this process's PID) until `release()`.

        Raises RunLocked, naming the folder and the holder, while another live process holds it; a lock
        left by a dead process is taken over. Then deletes temp files a killed writer left here.
        `optional`: a read-only folder is used without a lock (--evaluate, which writes only at its end).
        """
        lock = FolderLock(self.root)
        try:
            lock.acquire(optional=optional)
        except FolderBusy as busy:
            raise RunLocked(self.root, busy.holder) from None
        if lock.held:
            remove_temp_files(self.root, self.checkpoints)
        return lock

    def evaluation_file(self, config: RunConfig, step: int) -> Path:
        """Where an --evaluate of the checkpoint at `step` with `config` writes:
        `evaluations/step-<step>__<the sampling settings that differ from training's>.json` (`as_trained`
        when none does), so the evaluation of every checkpoint and setting is kept. Settings too long for a
        file name (a long sweep) are named by their digest instead; the file records them in full."""
        saved = self.saved_config()
        trained = sampling_settings(saved) if saved is not None else {}
        changed = "__".join(f"{key.rsplit('.', 1)[1]}={slug(_setting_text(value))}"
                            for key, value in sampling_settings(config).items() if trained.get(key) != value)
        if len(changed) > MAX_EVALUATION_NAME:
            changed = "settings-" + hashlib.sha256(changed.encode()).hexdigest()[:16]
        return self.evaluations / f"step-{step}__{changed or 'as_trained'}.json"

    def holder(self) -> str | None:
        """The live process holding the run's lock (training or evaluating it), or None; a lock left by a
        dead process is no holder (and is cleared)."""
        if not (self.root / FolderLock.NAME).exists():
            return None
        try:
            FolderLock(self.root).acquire(optional=True).release()
        except FolderBusy as busy:
            return busy.holder
        return None

    def reached_step(self) -> int:
        """How far the run got: the step of its newest checkpoint that verifies (a damaged file's name says
        nothing) or of its final.json."""
        steps = [newest_verified_step(self.checkpoints)]
        final = self.read_final()
        if isinstance(final, dict) and isinstance(final.get("step"), int):  # a damaged one says nothing
            steps.append(final["step"])
        return max(steps, default=0)

    def check(
        self, config: RunConfig, resume: bool, overwrite: bool, may_change: tuple[str, ...] = RESUMABLE_CHANGES,
        start_over: str | None = "--overwrite",
    ) -> None:
        """Refuse to clobber an existing run unless asked; only reads, so every process may call it.
        `start_over`: the option that starts this run over, or None where none does for it alone (in a study,
        --overwrite starts every run over): then the advice is to move this run's folder away."""
        if not self._run_files() or overwrite:
            return
        again = (f"{start_over} to start over" if start_over else
                 f"move '{self.root}' away to train that run again (--overwrite would start every run over)")
        if not resume:
            raise ConfigError(f"results dir '{self.root}' already holds a run; pass --resume to continue it or {again}")
        evaluating = set(SAMPLING_KEYS) <= set(may_change)  # --evaluate only reads the run: no start over
        action = "evaluate" if evaluating else "resume"
        saved = self.saved_config()
        if saved is None:
            raise ConfigError(f"cannot {action} '{self.root}': it has no config.yaml; restore it"
                              + ("" if evaluating else f", or {again}"))
        changed = config_differences(saved, config, ignore=may_change)
        if changed:
            advice = (f"an evaluation may change only {', '.join(may_change)}" if evaluating
                      else f"use another results dir or {again}")
            raise ConfigError(f"cannot {action} '{self.root}': its config differs in {', '.join(changed)}; {advice}")
        reached = self.reached_step()
        # it would report the longer run as finished at the shorter length (a FLOP budget sets its own length)
        if reached > config.train.steps and config.train.budget_flops == 0 and not evaluating:
            raise ConfigError(
                f"cannot resume '{self.root}' with train.steps = {config.train.steps}: the run already reached "
                f"step {reached}; pass train.steps >= {reached}, or {again}"
            )

    def prepare(self, config: RunConfig, overwrite: bool, code: dict[str, Any] | None = None) -> None:
        """Clear an old run if overwriting, then save the resolved config (after `check`), headed by a
        comment naming the code that (re)started the run (`code_version`), where known."""
        if overwrite:
            for path in self._run_files():
                with writing(path):
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        make_folder(self.root)
        atomic_write_text(self.config, code_comment(code or {}) + config.to_yaml())

    # -- metrics -------------------------------------------------------------------------------------
    def append_metrics(self, record: dict[str, Any]) -> None:
        # one complete line per write: a kill can at worst tear the last line, which read_metrics skips and
        # truncate_metrics removes on resume; a failed write (full disk) leaves the file as it was
        append_line(self.metrics, json.dumps(record))

    def read_metrics(self) -> list[dict[str, Any]]:
        """The records of metrics.jsonl: JSON objects with an int `step`, as the trainer writes them; a
        torn or foreign line (garbage, a list, a step of another type) is skipped."""
        if not self.metrics.exists():
            return []
        records = []
        for line in self.metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and not isinstance(record["step"], bool):
                records.append(record)
        return records

    def truncate_metrics(self, step: int) -> None:
        """Drop records logged after `step` (the checkpoint a resumed run restarts from)."""
        if self.metrics.exists():
            kept = [r for r in self.read_metrics() if r["step"] <= step]
            atomic_write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in kept))

    # -- final results -------------------------------------------------------------------------------
    def write_final(self, result: Final) -> None:
        atomic_write_json(self.final, result)

    def read_final(self) -> Final | None:
        """final.json's object, or None when the file is absent or damaged (see `final_problem`): callers
        treat None as "not finished", so a damaged final.json is recomputed on --resume."""
        if not self.final.exists():
            return None
        try:
            data = json.loads(self.final.read_text())
        except (json.JSONDecodeError, OSError, UnicodeDecodeError):
            return None
        return data if final_problem(data) is None else None


class _Ended(TypedDict):
    status: str  # "finished" or "failed" (a run diverged): the one key every final.json has


class Final(_Ended, total=False):
    """final.json: how a run ended and, for a finished run, what its task declares and what it scored. The
    one definition of the file: the trainer writes it, `final_problem` checks a read one against it (so
    `RunDir.read_final` and `RunRecord` hold only files that fit it) and the report reads it.

    A finished run also holds the Evaluator's results (evaluate.py) at the top level: <metric>_<set> (EMA
    model) and <metric>_<set>_raw for its declared metrics and sets (`score_keys`), then inference_steps_sweep,
    sampler, sampler_flops_per_answer, inference_steps_sweep_flops, ranking_<set>[_raw], best_of_<set>[_raw]
    and samplers, as eval.* asked for them."""

    step: int  # the last step trained (a failed run: the last before its divergence)
    error: str  # a failed run: why
    # the task's declaration (a finished run's): metric -> which way is better (DIRECTIONS), its label, the sets
    metrics: dict[str, str]
    metric_labels: dict[str, str]
    sets: list[str]
    yardsticks: dict[str, dict[str, dict[str, float]]]  # set -> predictor (zeros, linear, ...) -> metric -> value
    loss: float  # the last train line's, where the strategy logs it
    loss_denoise: float
    loss_energy: float
    energy_grad_evals: float  # cumulative energy-gradient evaluations per sample
    num_processes: int
    pack_size: int  # runs trained as one batched model
    train_seconds: float  # its share of the pack's training time
    steps_per_second: float
    flops_per_step: float  # matmul FLOPs of one training step, all processes together
    train_flops: float
    budget_flops: float  # train.budget_flops (0: none)
    git_commit: str  # the code that trained it (code_version), where known
    git_dirty: bool
    git_error: str  # why a checkout's commit is unknown (git not installed)


DIRECTIONS = ("lower", "higher")  # final.json "metrics": name -> which way is better
RUN_STATUSES = ("finished", "failed", "missing", "damaged")
_KINDS = {float: "a number", int: "an int", str: "a string", bool: "a bool"}  # of Final's one-value fields
_SCALARS = {key: kind for key, kind in get_type_hints(Final).items() if kind in _KINDS}


def is_number(value: Any) -> bool:
    """A JSON number (NaN included), not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fits(value: Any, kind: type) -> bool:
    if kind is float:
        return is_number(value)
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def score_keys(final: dict[str, Any]) -> list[str]:
    """The score keys a final.json declares: <metric>_<set> (EMA model) and <metric>_<set>_raw, task order."""
    metrics, sets = final.get("metrics"), final.get("sets")
    if not isinstance(metrics, dict) or not isinstance(sets, list):
        return []
    return [f"{m}_{s}{suffix}" for m in metrics for s in sets for suffix in ("", "_raw")]


def _declaration_problem(final: dict[str, Any]) -> str | None:
    """Why the task's declaration (metrics with directions, their labels, the held-out sets) is unusable.
    A finished run must declare it: its scores mean nothing without their names and directions."""
    metrics, sets, labels = final.get("metrics"), final.get("sets"), final.get("metric_labels", {})
    if final["status"] == "finished" and ("metrics" not in final or "sets" not in final):
        return f"final.json lacks '{'metrics' if 'metrics' not in final else 'sets'}' (a finished run declares its task's metrics and sets)"
    if "metrics" in final and not (isinstance(metrics, dict) and metrics and all(
            isinstance(k, str) and v in DIRECTIONS for k, v in metrics.items())):  # fmt: skip
        return f"final.json 'metrics' is {metrics!r}, not a mapping of metric names to 'lower' or 'higher'"
    if "sets" in final and not (isinstance(sets, list) and sets and all(isinstance(v, str) for v in sets)):
        return f"final.json 'sets' is {sets!r}, not a list of held-out set names"
    if not (isinstance(labels, dict) and all(isinstance(v, str) for v in labels.values())):
        return f"final.json 'metric_labels' is {labels!r}, not a mapping of metric names to text"
    return None


def final_problem(final: Any) -> str | None:
    """Why a final.json's content does not fit `Final` (not an object, a field of the wrong type, a finished
    run without its declaration, a declared score that is no number), else None. Checked in this order:
    status and step, the declaration, the scores, the other fields."""
    if not isinstance(final, dict):
        return f"final.json holds a JSON {type(final).__name__}, not an object"
    keys = ["status", "step"]
    if (problem := _field_problem(final, keys)) is not None or (problem := _declaration_problem(final)) is not None:
        return problem
    return _field_problem(final, score_keys(final)) or _field_problem(final, [k for k in _SCALARS if k not in keys])


def _field_problem(final: dict[str, Any], keys: list[str]) -> str | None:
    """The first of `keys` that `final` has (or `Final` requires) with a value of the wrong kind: a score
    (a key `Final` leaves open) must be a number."""
    for key in keys:
        kind = _SCALARS.get(key, float)
        if (key in final or key in Final.__required_keys__) and not _fits(final.get(key), kind):
            return f"final.json '{key}' is {final.get(key)!r}, not {_KINDS[kind]}"
    return None


def _read_config(path: Path) -> dict[str, Any] | None:
    """config.yaml as dotted keys, read as plain YAML (not validated: a folder written by another version
    of the code may hold keys this one does not know); None when absent or unreadable."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return flatten(data) if isinstance(data, dict) else None


@dataclass
class RunRecord:
    """One run of a study as the report sees it: labels, seed, final.json, metrics and config.

    `final` is None for a missing or damaged final.json; `damage` says why it is damaged. A `final`
    given with fields of the wrong type is moved to `damage` on construction, so every RunRecord obeys
    the same rule however it was made.
    """

    run_id: str
    strategy: str
    sweep: dict[str, Any]
    seed: int
    final: Final | None
    metrics: list[dict[str, Any]]
    config: dict[str, Any] | None = None  # config.yaml flattened to dotted keys, e.g. "task.rank"
    damage: str | None = None
    holder: str | None = None  # the live process training the run, while it has no final.json

    def __post_init__(self) -> None:
        if self.final is not None and (problem := final_problem(self.final)) is not None:
            self.final, self.damage = None, problem

    @classmethod
    def from_run_dir(cls, run_dir: RunDir, run_id: str, strategy: str, sweep: dict[str, Any], seed: int) -> RunRecord:
        """Read a run's folder; never raises for damaged files (they are reported, not fatal)."""
        final, damage = None, None
        if run_dir.final.exists():
            try:
                final = json.loads(run_dir.final.read_text())
            except (json.JSONDecodeError, OSError, UnicodeDecodeError) as error:
                damage = f"final.json is not valid JSON ({error})"
        metrics = [r for r in run_dir.read_metrics() if isinstance(r, dict)]
        holder = None if run_dir.final.exists() else run_dir.holder()
        return cls(run_id, strategy, sweep, seed, final, metrics, _read_config(run_dir.config), damage, holder)

    @property
    def group(self) -> str:
        """Strategy plus sweep values, e.g. 'adversarial · mining.opt_steps=5'."""
        return " · ".join([self.strategy, *(f"{key}={value}" for key, value in self.sweep.items())])

    @property
    def status(self) -> str:
        """finished | failed | missing | damaged (one of RUN_STATUSES), or "in progress" (a live process holds it)."""
        if self.damage is not None:
            return "damaged"
        if self.final is None:
            return "in progress" if self.holder else "missing"
        return "finished" if self.final["status"] == "finished" else "failed"

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    def final_number(self, key: str) -> float:
        """A number from final.json (NaN when absent)."""
        value = (self.final or {}).get(key)
        return float(value) if is_number(value) else math.nan

    def curve(self, kind: str, x_key: str, y_key: str) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of the `kind` records that carry finite numbers for both keys, sorted by x."""
        points = [
            (float(r[x_key]), float(r[y_key]))
            for r in self.metrics
            if r.get("kind") == kind and _finite(r.get(x_key)) and _finite(r.get(y_key))
        ]
        points.sort(key=lambda p: p[0])
        return np.array([p[0] for p in points]), np.array([p[1] for p in points])


def _finite(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)
