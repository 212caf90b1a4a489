"""Live dashboards: each run's metrics.jsonl records, also sent to TensorBoard or Weights & Biases.

accelerate's tracker classes do the sending. One tracker per run (not one per Accelerator, which
accelerate's `log_with` would give): a pack trains several runs in one process, and a study many.
TensorBoard events go to `<run>/tensorboard/` (`tensorboard --logdir results/<study>/runs` shows every run
under its id); W&B runs are named by the run id in the project `ired`.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from diffusion_lib.harness.config import ConfigError

_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_tracker(kind: str) -> None:
    """Refuse a tracker whose package is missing, in one line naming what to install."""
    package = _PACKAGES.get(kind)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"train.log_with = '{kind}' needs the {package} package: pip install {package}")


class RunTracker:
    """Sends one run's records to a dashboard, as `<kind>/<key>` scalars at the record's step."""

    def __init__(self, kind: str, run_folder: Path, config: dict[str, Any]):
        from accelerate.tracking import TensorBoardTracker, WandBTracker

        check_tracker(kind)
        if kind == "tensorboard":
            self.tracker = TensorBoardTracker("tensorboard", run_folder)
        else:
            # reinit="create_new": the runs of a pack are live at once, each its own W&B run (wandb >= 0.19.10)
            self.tracker = WandBTracker("ired", name=run_folder.name, dir=str(run_folder), config=config,
                                        reinit="create_new")
        self.tracker.start()

    def log(self, record: dict[str, Any]) -> None:
        values: dict[str, float] = {}
        for key, value in record.items():
            if key in ("kind", "step"):
                continue
            if isinstance(value, list):  # per inner step: accept_rate_steps -> accept_rate_step1, ...
                values.update({f"{record['kind']}/{key[:-1]}{i}": v for i, v in enumerate(value, 1)})
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                values[f"{record['kind']}/{key}"] = value
        self.tracker.log(values, step=record["step"])

    def finish(self) -> None:
        self.tracker.finish()
