"""Exclusive lock files: one writer per store or run folder.

An ``flock`` on a file, so the OS releases it when the holder exits, however it exits
(a crash or ``kill -9`` never leaves a store or a run stuck). The file holds the holder's
pid, for the message of whoever is refused, and is removed on release (a crash leaves it,
harmless: the next holder takes it over). Local paths only.
"""

from __future__ import annotations

import os
from pathlib import Path


class LockBusy(Exception):
    """Another process holds the lock; ``holder`` is its pid as it wrote it ("?" if none)."""

    def __init__(self, path: Path, holder: str):
        self.path, self.holder = path, holder
        super().__init__(f"{path} is held by pid {holder}")


class LockFile:
    """``acquire()`` takes the lock at ``path`` (its folder must exist) or raises
    ``LockBusy``; ``release()`` (or leaving a ``with``) removes the file and lets go."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self) -> LockFile:
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise LockBusy(self.path, holder) from None
            try:  # the holder we waited for may have removed this file: take the new one
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still held: no one can take it between
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> LockFile:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
