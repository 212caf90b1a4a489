"""What a run writes and where: resolved config, metrics log, checkpoints, final results."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .checkpoint import checkpoint_step, list_checkpoints
from .config import ConfigError, RunConfig, config_differences, config_from_file
from .utils import (
    FolderBusy, FolderLock, append_line, atomic_write_json, atomic_write_text, make_folder, remove_temp_files, writing,
)

# keys a resumed run may change: where it runs, where it writes, and how long it trains
RESUMABLE_CHANGES = ("device", "results_dir", "train.steps")
# and what scoring a saved model (--evaluate) may change besides: how it samples and on how many problems
EVALUATION_CHANGES = (*RESUMABLE_CHANGES, "diffusion.inference_steps", "diffusion.inference_step_scale",
                      "eval.every", "eval.num_samples", "eval.batch_size", "eval.inference_steps_sweep")


class RunLocked(ConfigError):
    """Another live process is training or evaluating this run (it holds the run folder's lock)."""


class RunDir:
    """One run's folder: config.yaml, metrics.jsonl, checkpoints/, final.json."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.metrics = self.root / "metrics.jsonl"
        self.checkpoints = self.root / "checkpoints"
        self.final = self.root / "final.json"

    def _run_files(self) -> list[Path]:
        return [p for p in (self.config, self.metrics, self.checkpoints, self.final) if p.exists()]

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
            raise RunLocked(
                f"run folder '{self.root}' is in use by {busy.holder}, which is training or evaluating it; "
                "wait until it ends or stop it"
            ) from None
        if lock.held:
            remove_temp_files(self.root, self.checkpoints)
        return lock

    def reached_step(self) -> int:
        """How far the run got: the step of its newest checkpoint (by file name) or of its final.json."""
        steps = [checkpoint_step(path) for path in list_checkpoints(self.checkpoints)[:1]]
        final = self.read_final()
        if isinstance(final, dict) and isinstance(final.get("step"), int):  # a damaged one says nothing
            steps.append(final["step"])
        return max(steps, default=0)

    def check(
        self, config: RunConfig, resume: bool, overwrite: bool, may_change: tuple[str, ...] = RESUMABLE_CHANGES
    ) -> None:
        """Refuse to clobber an existing run unless asked; only reads, so every process may call it."""
        if not self._run_files() or overwrite:
            return
        if not resume:
            raise ConfigError(
                f"results dir '{self.root}' already holds a run; pass --resume to continue it or --overwrite to start over"
            )
        saved = self.saved_config()
        if saved is None:
            raise ConfigError(f"cannot resume '{self.root}': it has no config.yaml; use --overwrite to start over")
        changed = config_differences(saved, config, ignore=may_change)
        if changed:
            raise ConfigError(
                f"cannot resume '{self.root}': its config differs in {', '.join(changed)}; "
                "use another results dir or --overwrite"
            )
        reached = self.reached_step()
        if reached > config.train.steps:  # it would report the longer run as finished at the shorter length
            raise ConfigError(
                f"cannot resume '{self.root}' with train.steps = {config.train.steps}: the run already reached "
                f"step {reached}; pass train.steps >= {reached}, or --overwrite to start over"
            )

    def prepare(self, config: RunConfig, overwrite: bool) -> None:
        """Clear an old run if overwriting, then save the resolved config (after `check`)."""
        if overwrite:
            for path in self._run_files():
                with writing(path):
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        make_folder(self.root)
        atomic_write_text(self.config, config.to_yaml())

    # -- metrics -------------------------------------------------------------------------------------
    def append_metrics(self, record: dict[str, Any]) -> None:
        # one complete line per write: a kill can at worst tear the last line, which read_metrics skips and
        # truncate_metrics removes on resume; a failed write (full disk) leaves the file as it was
        append_line(self.metrics, json.dumps(record))

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        records = []
        for line in self.metrics.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def truncate_metrics(self, step: int) -> None:
        """Drop records logged after `step` (the checkpoint a resumed run restarts from)."""
        if self.metrics.exists():
            kept = [r for r in self.read_metrics() if r.get("step", 0) <= step]
            atomic_write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in kept))

    # -- final results -------------------------------------------------------------------------------
    def write_final(self, result: dict[str, Any]) -> None:
        atomic_write_json(self.final, result)

    def read_final(self) -> dict[str, Any] | None:
        if not self.final.exists():
            return None
        try:
            return json.loads(self.final.read_text())
        except (json.JSONDecodeError, OSError):
            return None
