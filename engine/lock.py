"""One writer per pool: `<out>/.dfq.lock`, held with `fcntl.flock` by the driver for the whole run.

flock is released by the kernel when the process dies, so a crashed driver never leaves a stale
lock behind (the file may remain; an unlocked file means nobody runs). The file is unlinked on a
clean release; to make that safe, `acquire` re-checks after locking that the path still names the
inode it locked (otherwise a racing release unlinked it) and retries.
"""

from __future__ import annotations

import fcntl
import os
import socket

from engine.errors import EngineError

LOCK_NAME = ".dfq.lock"


class PoolLock:
    """Exclusive, non-blocking lock on a local pool directory. Use as a context manager."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> PoolLock:
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise EngineError(f"another dfq generate is running on {self.out_dir}") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
                self._fd = fd
                return self
            os.close(fd)  # the file we locked was unlinked by a releasing driver: lock the new one
        raise EngineError(f"could not lock {self.path}")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> PoolLock:
        return self.acquire()

    def __exit__(self, *_: object) -> None:
        self.release()
