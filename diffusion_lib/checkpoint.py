"""Checkpoints: checksummed, written atomically, the newest `keep` that verify kept, a damaged one skipped.

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
from typing import IO, Any

from .utils import atomic_write_bytes

_NAME = re.compile(r"^step-(\d+)\.pt$")
DIGEST_MEMBER = ".sha256"
_CHUNK = 1 << 20


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

    torch.save({"step": step, **state}, buffer)  # in memory first: a full disk fails in our write, by name
    with zipfile.ZipFile(buffer, "a") as archive:
        _, digest = _digests(archive)
        archive.writestr(f"{_prefix(archive)}/{DIGEST_MEMBER}", digest)
    path = checkpoint_path(folder, step)
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
