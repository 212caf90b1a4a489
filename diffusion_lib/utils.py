"""Small helpers shared across the library: defaults, atomic file writes, folder locks, seed mixing."""
from __future__ import annotations

import contextlib
import difflib
import errno
import fcntl
import json
import os
import re
import reprlib
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T")


def exists(value: Any) -> bool:
    return value is not None


def default(value: T | None, fallback: T | Callable[[], T]) -> T:
    if exists(value):
        return value
    return fallback() if callable(fallback) else fallback


def suggest(key: str, allowed: list[str]) -> str:
    """' (did you mean 'x'?)' for the closest allowed name, or '' when nothing is close."""
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


_BRIEF = reprlib.Repr()
_BRIEF.maxstring = _BRIEF.maxother = 60
_BRIEF.maxlist = _BRIEF.maxtuple = _BRIEF.maxdict = 8
_BRIEF.maxlevel = 3


def slug(value: Any) -> str:
    """`value` as text fit for a file name: anything but letters, digits, '.', '+' and '-' becomes '-'."""
    return re.sub(r"[^\w.+-]", "-", str(value))


def brief_repr(value: Any) -> str:
    """repr() cut to a line: error messages quote user values, which may be huge or deeply nested."""
    return _BRIEF.repr(value)


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


class FolderBusy(Exception):
    """Another live process holds the folder's lock."""

    def __init__(self, path: Path, holder: str):
        self.path, self.holder = path, holder
        super().__init__(f"{path} is locked by {holder}")


class FolderLock:
    """An exclusive `flock` on `<folder>/.lock` whose file holds the owner's PID and host.

    The kernel drops the lock when its process dies, however it dies, so a lock left by a killed process
    is simply taken over. `release()` deletes the lock file, and the folders that `acquire()` created if
    they are empty again, so a refused run leaves nothing behind.
    """

    NAME = ".lock"

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / self.NAME
        self._fd: int | None = None
        self._created: list[Path] = []

    def acquire(self, wait: bool = False, optional: bool = False) -> FolderLock:
        """Take the lock (raise FolderBusy if another process holds it, unless `wait`). `optional`: where
        the folder cannot be written at all (read-only), go on without a lock instead of failing."""
        try:
            self._created = make_folder(self.folder)
            with writing(self.path):
                self._fd = self._open_locked(wait)
                os.ftruncate(self._fd, 0)
                os.write(self._fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        except BaseException as error:
            self.release()
            if optional and isinstance(error, OSError) and error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                return self
            raise
        return self

    def _open_locked(self, wait: bool) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # not inherited by child processes
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").split()
                os.close(fd)
                raise FolderBusy(self.folder, f"process {holder[0]} on {holder[1]}" if len(holder) == 2
                                 else "another process") from None
            # a holder may have deleted the file between our open and our flock: lock the current one
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    return fd
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Idempotent; the file goes first, while still locked, so no one locks a file about to vanish."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(self._fd)
            self._fd = None
        for folder in reversed(self._created):
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []

    def __del__(self) -> None:
        # an abandoned lock (e.g. a trainer built only to time a few steps) goes with its descriptor
        if self._fd is not None:
            os.close(self._fd)

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to serve large blocks from its heap and keep what is freed (Linux, CPU training).

    By default glibc maps every block above its mmap threshold afresh and unmaps it when freed, so each
    training step page-faults its big activations back in: at rank 20, batch 2048 that cost 6 % of a lone
    run's step and half the throughput of a pack of 10 on a 2-core CPU (benchmarks/results.md). The
    process then keeps its peak heap until it exits. Returns whether the settings took (False where the
    C library is not glibc).
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def mix_seed(*parts: int) -> int:
    """Deterministically combine integers (seed, step, process, ...) into one 63-bit seed."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) + 0x9E3779B97F4A7C15 + (value << 6) + (value >> 2))) & (2**64 - 1)
        value = (value * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    return value >> 1
