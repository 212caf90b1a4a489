"""One writer per folder: an exclusive lock whose file names its holder."""
from __future__ import annotations

import contextlib
import errno
import os
import socket
from pathlib import Path

from filelock import FileLock, Timeout

from diffusion_lib.harness.files import make_folder, writing


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
