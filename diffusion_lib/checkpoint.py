"""Checkpoints: written atomically, the newest `keep` kept, a corrupt newest one skipped for the previous."""
from __future__ import annotations

import random
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .utils import atomic_torch_save

_NAME = re.compile(r"^step-(\d+)\.pt$")


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step-{step:09d}.pt"


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint file holds, from its name."""
    return int(_NAME.match(path.name).group(1))


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoint files in `folder`, newest step first."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _NAME.match(p.name)), key=checkpoint_step, reverse=True)


def save_checkpoint(folder: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    path = checkpoint_path(folder, step)
    atomic_torch_save(path, {"step": step, **state})
    for old in list_checkpoints(folder)[keep:]:
        old.unlink(missing_ok=True)
    return path


def load_latest_checkpoint(folder: Path, required: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """The newest readable checkpoint; unreadable ones are reported by name on stderr and skipped."""
    for path in list_checkpoints(folder):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            missing = [key for key in ("step", *required) if key not in state]
            if missing:
                raise KeyError(f"missing {', '.join(missing)}")
        except Exception as error:  # any failure to read means: fall back to an older checkpoint
            print(f"warning: checkpoint {path} is unreadable ({type(error).__name__}); trying the previous one", file=sys.stderr)
            continue
        state["path"] = str(path)
        return state
    return None


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch and CUDA RNG states, as tensors and plain values (safe for weights_only loads)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "cached": cached},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        ("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
