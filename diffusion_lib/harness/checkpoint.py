"""Checkpoints: checksummed, written atomically, the newest `keep` that verify kept, a damaged one skipped;
and a pack's training state as one checkpoint per run (`save_pack`, `load_pack`).

A checkpoint is torch.save's zip archive plus one member, `<archive>/.sha256`, holding the SHA-256 of
every other member's name and bytes; so `torch.load` still reads it, and `load_latest_checkpoint`
verifies it first (Python's zipfile also checks each member's CRC-32 as it reads). An archive without
that member is not one of ours, or was cut short: it is skipped like a damaged one.
"""
from __future__ import annotations

import errno
import hashlib
import io
import re
import sys
import zipfile
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Sequence

from diffusion_lib.harness.config import ConfigError
from diffusion_lib.harness.io import atomic_write_bytes

if TYPE_CHECKING:  # torch is imported where used: naming and listing checkpoints must not load it (--help)
    from torch import Tensor, nn, optim

_NAME = re.compile(r"^step-(\d+)\.pt$")
DIGEST_MEMBER = ".sha256"
_CHUNK = 1 << 20
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


class CheckpointDamaged(Exception):
    """A checkpoint whose content does not match its SHA-256."""


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step-{step:09d}.pt"


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint's file name says (its content is only read by loading it)."""
    match = _NAME.match(path.name)
    if match is None:
        raise ValueError(f"{path} is not named like a checkpoint (step-NNNNNNNNN.pt)")
    return int(match.group(1))


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoint files in `folder`, newest step first."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _NAME.match(p.name)), key=checkpoint_step, reverse=True)


def save_checkpoint(folder: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write `state` as step `step` and check it on disk; then keep it and the newest `keep - 1` older
    checkpoints that verify, deleting the rest: damaged ones, and any of a higher step (left from before
    the run went back to an earlier checkpoint, so not part of its history)."""
    buffer = io.BytesIO()
    import torch  # here, not at the top: naming and listing checkpoints must not load torch (--help)

    path = checkpoint_path(folder, step)
    try:
        torch.save({"step": step, **state}, buffer)  # in memory first: a full disk fails in our write, by name
        with zipfile.ZipFile(buffer, "a") as archive:
            _, digest = _digests(archive)
            archive.writestr(f"{_prefix(archive)}/{DIGEST_MEMBER}", digest)
    except (MemoryError, RuntimeError) as error:
        # the in-memory buffer could not grow: torch.save reports that as a RuntimeError ("unexpected pos");
        # nothing is on disk yet, and the older checkpoints stay
        raise MemoryError(f"while writing the checkpoint {path}") from error
    atomic_write_bytes(path, buffer.getbuffer())
    problem = _problem(path)
    if problem is not None:  # read back (from the page cache): the write went wrong; keep the older ones
        raise OSError(errno.EIO, f"checkpoint damaged right after writing it ({problem})", str(path))
    kept = 1
    for candidate in list_checkpoints(folder):
        if candidate == path:
            continue
        if kept < keep and checkpoint_step(candidate) < step:
            problem = _problem(candidate)
            if problem is None:
                kept += 1
                continue
            print(f"warning: checkpoint {candidate} is unreadable ({problem}); deleted", file=sys.stderr)
        candidate.unlink(missing_ok=True)
    return path


def _prefix(archive: zipfile.ZipFile) -> str:
    return archive.namelist()[0].split("/", 1)[0]  # torch.save names every member '<archive>/...'


def _digests(archive: zipfile.ZipFile) -> tuple[str | None, str]:
    """(the SHA-256 the archive holds or None, the SHA-256 of its other members' names and bytes)."""
    stored, digest = None, hashlib.sha256()
    for info in archive.infolist():
        if info.filename == f"{_prefix(archive)}/{DIGEST_MEMBER}":
            stored = archive.read(info).decode(errors="replace")
            continue
        digest.update(info.filename.encode() + b"\0" + info.file_size.to_bytes(8, "little"))
        with archive.open(info) as member:  # zipfile raises BadZipFile on a member whose CRC-32 is wrong
            while chunk := member.read(_CHUNK):
                digest.update(chunk)
    return stored, digest.hexdigest()


def _verify(handle: IO[bytes] | Path) -> None:
    """Raises if the checkpoint does not match its SHA-256, has none, or is unreadable."""
    with zipfile.ZipFile(handle) as archive:
        stored, computed = _digests(archive)
    if stored is None:
        raise CheckpointDamaged("no checksum: not a checkpoint this code wrote")
    if stored != computed:
        raise CheckpointDamaged("checksum mismatch: the file is damaged")


def _problem(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be trusted, or None. The OS failing to read it (permissions, an
    I/O error, a stale network mount) is raised instead: that says nothing about the file, and treating it
    as damage would make a resume start over and delete good checkpoints."""
    try:
        _verify(path)
    except (OSError, MemoryError):
        raise
    except Exception as error:  # a damaged archive or a checksum mismatch
        return _reason(error)
    return None


def newest_verified_step(folder: Path) -> int:
    """The step of the newest checkpoint in `folder` that verifies (the one a resume starts from), or 0."""
    return next((checkpoint_step(path) for path in list_checkpoints(folder) if _problem(path) is None), 0)


def _reason(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error).strip().splitlines()[0][:120] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _load(path: Path) -> dict[str, Any]:
    """A checkpoint's state, verified first (read once into memory, so what is verified is what loads)."""
    data = io.BytesIO(path.read_bytes())
    _verify(data)
    data.seek(0)
    import torch

    return torch.load(data, map_location="cpu", weights_only=True)


def load_latest_checkpoint(folder: Path, required: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """The newest checkpoint that verifies and holds `required`; others are named on stderr and skipped."""
    for path in list_checkpoints(folder):
        try:
            state = _load(path)
            missing = [key for key in ("step", *required) if key not in state]
            if missing:
                raise KeyError(f"missing {', '.join(missing)}")
        except (OSError, MemoryError):
            raise  # the OS said no: not the checkpoint's fault (see _problem)
        except Exception as error:  # damaged or incomplete: fall back to an older checkpoint
            print(f"warning: checkpoint {path} is unreadable ({_reason(error)}); trying the previous one",
                  file=sys.stderr)
            continue
        state["path"] = str(path)
        return state
    return None


# -- a pack's training state: one checkpoint per run, each as if the run trained alone -------------------
def save_pack(folders: Sequence[Path], step: int, model: nn.Module, ema_model: nn.Module, optimizer: optim.Adam,
              run_states: Sequence[dict[str, Any]], keep: int) -> None:
    """Checkpoint `step` of each run of a packed model in its folder: its weights, EMA weights and Adam
    moments with the run dimension dropped (reference names and shapes; no moments before Adam's first
    step), and `run_states[i]`, the trainer's bookkeeping of run i."""
    params, adam = dict(model.named_parameters()), optimizer.state
    for run, (folder, extra) in enumerate(zip(folders, run_states)):
        moments = {key: {name: adam[p][key][run].cpu().clone() for name, p in params.items()}
                   for key in ADAM_MOMENTS if all(key in adam.get(p, {}) for p in params.values())}
        state = {"model": run_state_dict(model, run), "ema": run_state_dict(ema_model, run),
                 "optimizer": {"step": step, **moments}, **extra}
        save_checkpoint(folder, step, state, keep=keep)


def load_pack(folders: Sequence[Path], model: nn.Module, ema_model: nn.Module,
              optimizer: optim.Adam) -> tuple[int, list[dict[str, Any]]] | None:
    """Load each run's newest verified checkpoint into its slot of the packed model, EMA and Adam state;
    (their step, each run's checkpoint), or None if no run has one. The runs must be at one step."""
    import torch

    states = [load_latest_checkpoint(folder, required=("model", "ema", "optimizer")) for folder in folders]
    if all(state is None for state in states):
        return None
    steps = {None if state is None else state["step"] for state in states}
    if len(steps) > 1:
        raise ConfigError(f"runs packed together must resume from one step; their checkpoints are at {sorted(steps, key=str)}")
    step, params, adam = states[0]["step"], dict(model.named_parameters()), optimizer.state
    # a checkpoint from before the first step (a signal right at the start) has no Adam moments yet:
    # then the optimiser starts fresh, as it would have
    moments = ADAM_MOMENTS if "exp_avg" in states[0]["optimizer"] else ()
    for run, state in enumerate(states):
        load_run_state_dict(model, state["model"], run)
        load_run_state_dict(ema_model, state["ema"], run)
        for key in moments:
            for name, p in params.items():
                slot = adam.setdefault(p, {})
                if key not in slot:
                    slot[key] = torch.zeros_like(p)
                slot[key][run].copy_(state["optimizer"][key][name])
    for p in params.values() if moments else ():
        adam[p]["step"] = torch.tensor(float(step))
    return step, states


# -- one run's weights out of a pack, and back ---------------------------------------------------------
def run_state_dict(module: nn.Module, run: int) -> dict[str, Tensor]:
    """Run `run`'s parameters with the run dimension dropped (reference names and shapes), on the CPU."""
    return {name: p.detach()[run].cpu().clone() for name, p in module.named_parameters()}


def load_run_state_dict(module: nn.Module, state: dict[str, Tensor], run: int) -> None:
    """Copy one run's weights (as `run_state_dict` gives them) into slot `run` of every packed parameter."""
    params = dict(module.named_parameters())
    missing, unexpected = set(params) - set(state), set(state) - set(params)
    if missing or unexpected:
        raise KeyError(f"run state does not fit the model: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    import torch

    with torch.no_grad():
        for name, p in params.items():
            if tuple(state[name].shape) != tuple(p.shape[1:]):
                raise ValueError(f"{name}: shape {tuple(state[name].shape)} does not fit {tuple(p.shape[1:])}")
            p[run].copy_(state[name])
