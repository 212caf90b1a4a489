"""What a run writes and where: resolved config, metrics log, checkpoints, final results."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig, config_differences, config_from_file
from .utils import atomic_write_json, atomic_write_text

# keys a resumed run may change: where it runs, where it writes, and how long it trains
RESUMABLE_CHANGES = ("device", "results_dir", "train.steps")
# and what scoring a saved model (--evaluate) may change besides: how it samples and on how many problems
EVALUATION_CHANGES = (*RESUMABLE_CHANGES, "diffusion.inference_steps", "diffusion.inference_step_scale",
                      "eval.every", "eval.num_samples", "eval.batch_size", "eval.inference_steps_sweep")


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

    def prepare(self, config: RunConfig, overwrite: bool) -> None:
        """Clear an old run if overwriting, then save the resolved config (after `check`)."""
        if overwrite:
            for path in self._run_files():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config, config.to_yaml())

    # -- metrics -------------------------------------------------------------------------------------
    def append_metrics(self, record: dict[str, Any]) -> None:
        # one complete line per write, opened in append mode: a kill can at worst tear the last line,
        # which read_metrics skips and truncate_metrics removes on resume
        with open(self.metrics, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()

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
