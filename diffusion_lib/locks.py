"""One writer per folder: an exclusive lock whose file names its holder."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from pathlib import Path

from .files import make_folder, writing


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
