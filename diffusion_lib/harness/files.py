"""Writing files so that a crash or a full disk never leaves a torn one, and OS errors that name the path."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


def slug(value: Any) -> str:
    """`value` as text fit for a file name: anything but letters, digits, '.', '+' and '-' becomes '-'."""
    return re.sub(r"[^\w.+-]", "-", str(value))


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Tag an OSError raised inside as a failure to write `path`, naming `path` (not a temp file's name),
    so the top level can print `cannot write '<path>': <reason>`."""
    try:
        yield
    except OSError as error:
        if error.errno is None or getattr(error, "action", None):
            raise
        tagged = OSError(error.errno, error.strerror, str(path))  # OSError(errno, ...) picks the subclass
        tagged.action = "write"  # type: ignore[attr-defined]
        raise tagged from error


def describe_os_error(error: OSError) -> str:
    """One line for an OSError: what failed, on which path, and the OS's reason."""
    reason = error.strerror or str(error)
    if error.filename is None:
        return reason
    return f"cannot {getattr(error, 'action', 'access')} '{error.filename}': {reason}"


def check_folder(path: str | Path) -> list[Path]:
    """What `make_folder(path)` would run into, found without creating anything (a dry run asks this):
    raises its OSError, naming `path`, for a file or a broken symbolic link in the way; returns the
    folders it would create, outermost first."""
    path = Path(path)
    missing = [p for p in (path, *path.parents) if not p.exists()][::-1]
    with writing(path):
        for folder in missing:  # mkdir would say "File exists" of a link that loops or points nowhere
            if folder.is_symlink():
                _refuse_broken_link(folder, path)
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
    return missing


def make_folder(path: str | Path) -> list[Path]:
    """mkdir -p that names a path which is a file as such; returns the folders it created, outermost first."""
    missing = check_folder(path)
    with writing(path):
        Path(path).mkdir(parents=True, exist_ok=True)
    return missing


def _refuse_broken_link(link: Path, path: Path) -> None:
    """Raise the true reason a symbolic link on the way to `path` cannot be followed: a loop, or no target."""
    name = "it" if link == path else f"'{link}'"
    try:
        os.stat(link)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, f"{name} is a symbolic link loop", str(path)) from None
    raise OSError(errno.ENOENT, f"{name} is a symbolic link to '{os.readlink(link)}', which does not exist", str(path))


# atomic_write's temp files: '.<name>.' + mkstemp's 8 random characters + '.tmp'
TEMP_FILE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "w") -> None:
    """Call `write(handle)` on a temp file in the same folder, fsync, then rename it over `path`.

    A reader (or a crash) sees either the old file or the complete new one, never a torn one. An OSError
    (full disk, read-only folder) names `path` and leaves no temp file; a kill can leave one, which
    `remove_temp_files` deletes when the folder's owner next starts.
    """
    path = Path(path)
    make_folder(path.parent)
    with writing(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; results should be as readable as any other
            with os.fdopen(fd, mode) as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text), "w")


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def atomic_write_bytes(path: str | Path, data: bytes | memoryview) -> None:
    atomic_write(path, lambda handle: handle.write(data), "wb")


def append_line(path: str | Path, line: str) -> None:
    """Append one line in a single write; if the write fails (full disk), cut the file back to its old
    length, so no torn line is left for the next append to run into."""
    data = line.encode() + b"\n"
    with writing(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(fd).st_size
            try:
                written = 0
                while written < len(data):
                    written += os.write(fd, data[written:])
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)


def remove_temp_files(*folders: Path) -> None:
    """Delete atomic_write's temp files left in `folders` by a killed writer (call only as their owner)."""
    for folder in folders:
        if folder.is_dir():
            for path in folder.iterdir():
                if TEMP_FILE.match(path.name) and path.is_file():
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
