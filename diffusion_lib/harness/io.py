"""Files and folders a crash never leaves torn: atomic writes, appends cut back on failure, OS errors that
name the path, and one writer per folder (an exclusive lock whose file names its holder); progress bars'
redraw rate on stderr."""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock, Timeout


def bar_rate() -> dict[str, float]:
    """tqdm's redraw settings: a terminal's bar often, but a bar going to a file (a log) only every 30 s (and
    not from tqdm's monitor thread, whose forced redraws come on top)."""
    return {"mininterval": 0.1} if sys.stderr.isatty() else {"mininterval": 30.0, "maxinterval": math.inf}


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


# -- one writer per folder -----------------------------------------------------------------------------
# the exit code of a command refused because another process holds a folder it needs: not bad input (2)
# nor the OS saying no (1), but "try again later" (sysexits.h's EX_TEMPFAIL)
EXIT_BUSY = 75


class FolderBusy(Exception):
    """Another live process holds the folder's lock; the same command may succeed once it is done."""

    message = "folder '{folder}' is in use by {holder}"

    def __init__(self, folder: Path, holder: str):
        self.folder, self.holder = folder, holder
        super().__init__(self.message.format(folder=folder, holder=holder))


class FolderLock:
    """An exclusive lock (filelock's `flock`) on `<folder>/.lock`, whose file holds the owner's PID and host.

    The kernel drops the lock when its process dies, however it dies, so a lock left by a killed process
    is simply taken over. filelock opens the file without truncating it, so a contender still reads the
    holder's line to name it. `release()` deletes the lock file, and the folders that `acquire()` created
    if they are empty again, so a refused run leaves nothing behind.
    """

    NAME = ".lock"

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / self.NAME
        self._lock: FileLock | None = None
        self._created: list[Path] = []

    def acquire(self, wait: bool = False, optional: bool = False) -> FolderLock:
        """Take the lock (raise FolderBusy if another process holds it, unless `wait`). `optional`: where
        the folder cannot be written at all (read-only), go on without a lock instead of failing."""
        # no soft-lock fallback: only a kernel lock is dropped when its holder dies
        lock = FileLock(self.path, blocking=wait, thread_local=False, fallback_to_soft=False,
                        on_acquired=_write_holder)
        try:
            self._created = make_folder(self.folder)
            with writing(self.path):
                try:
                    lock.acquire()
                except Timeout:
                    raise FolderBusy(self.folder, self._holder()) from None
        except BaseException as error:
            self.release()
            if optional and isinstance(error, OSError) and error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                return self
            raise
        self._lock = lock
        return self

    def _holder(self) -> str:
        """'process <pid> on <host>' from the lock file, or 'another process' before its holder wrote it."""
        try:
            holder = self.path.read_text(errors="replace").split()
        except OSError:
            holder = []
        return f"process {holder[0]} on {holder[1]}" if len(holder) == 2 else "another process"

    @property
    def held(self) -> bool:
        return self._lock is not None and self._lock.is_locked

    def release(self) -> None:
        """Idempotent. The file goes first, while still locked: a contender that locked it meanwhile sees
        it unlinked and opens the next one (filelock checks), so two processes never both hold the folder."""
        if self._lock is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self._lock.release()
            self._lock = None
        for folder in reversed(self._created):
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _write_holder(fd: int) -> None:
    """filelock's on_acquired hook: replace the file's content by this process's PID and host."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
