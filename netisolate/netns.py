"""Enter a network namespace safely: a dedicated thread per namespace, never the caller's thread.

`setns(2)` changes the namespace of the calling *thread* only, and threads and processes started
from it inherit that namespace. So each `NetNS` owns one worker thread that enters the namespace
once and runs every call for it; the caller's thread (an event loop, a pool worker) never moves,
and a worker thread never returns to serve another namespace.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
from collections.abc import Callable
from concurrent.futures import BrokenExecutor, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703  # ioctl on an nsfs file: which kind of namespace it is


class NetNSError(RuntimeError):
    """The namespace does not exist, is not a network namespace, or cannot be entered."""


def _setns(fd: int) -> None:
    setns = getattr(os, "setns", None)  # Python >= 3.12
    if setns is not None:
        setns(fd, CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class NetNS:
    """A network namespace held open by fd, so it cannot be recycled while we work on it."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path
        self.inode = os.fstat(fd).st_ino
        self._worker: ThreadPoolExecutor | None = None

    @classmethod
    def open(cls, target: str | int) -> NetNS:
        """A path (`/run/netns/X`, `/proc/PID/ns/net`) or a PID. Never creates a namespace."""
        path = f"/proc/{target}/ns/net" if isinstance(target, int) else target
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise NetNSError(f"cannot open network namespace {path}: {err.strerror}") from None
        try:
            kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError:
            kind = -1
        if kind != CLONE_NEWNET:
            os.close(fd)
            raise NetNSError(f"{path} is not a network namespace")
        return cls(fd, path)

    @classmethod
    def current(cls) -> NetNS:
        return cls.open("/proc/thread-self/ns/net")

    def _enter(self) -> None:
        try:
            _setns(self.fd)
        except OSError as err:
            raise NetNSError(f"cannot enter network namespace {self.path}: {err.strerror}") from None

    def run(self, fn: Callable[[], T]) -> T:
        """Run fn on this namespace's own thread; subprocesses fn starts live in the namespace."""
        if self._worker is None:
            self._worker = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"netns-{self.inode}", initializer=self._enter
            )
        try:
            return self._worker.submit(fn).result()
        except BrokenExecutor:  # the initializer (setns) failed
            raise NetNSError(f"cannot enter network namespace {self.path}") from None

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> NetNS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
