"""Enter a network namespace safely: a short-lived thread per call, never the caller's thread.

`setns(2)` changes the namespace of the calling *thread* only, and threads and processes started
from it inherit that namespace. So every call runs on a fresh thread that enters the namespace and
ends with the call: the caller's thread (an event loop, a pool worker) never moves, and no thread
is ever left behind inside a pod's namespace. (A thread costs ~0.1 ms on an idle host and a few
on a busy one, so the calls of one apply share the first one's thread.)
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any, TypeVar, cast

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
NS_GET_USERNS = 0xB701  # ioctl on an nsfs file: an fd of the user namespace that owns it
NS_GET_NSTYPE = 0xB703  # ioctl on an nsfs file: which kind of namespace it is


_inside = threading.local()  # .inode: the namespace a thread of ours entered


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


_SO_NETNS_COOKIE = 71


def _own_cookie() -> int:
    """The cookie of the calling thread's network namespace, as any socket made there tells."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        return int(struct.unpack("=Q", probe.getsockopt(socket.SOL_SOCKET, _SO_NETNS_COOKIE, 8))[0])


class NetNS:
    """A network namespace held open by fd, so it cannot be recycled while we work on it."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path
        self.inode = os.fstat(fd).st_ino
        self._cookie = 0

    @property
    def cookie(self) -> int:
        """The namespace's cookie (Linux >= 5.14): unlike its inode number, which the kernel hands
        a new namespace once this one is gone, never another namespace's while the machine runs."""
        if not self._cookie:
            self._cookie = self.run(_own_cookie)
        return self._cookie

    @classmethod
    def open(cls, target: str | int) -> NetNS:
        """A path (`/run/netns/X`, `/proc/PID/ns/net`) or a PID. Never creates a namespace."""
        path = f"/proc/{target}/ns/net" if isinstance(target, int) else target
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise NetNSError(f"cannot open network namespace {path}: {err.strerror}") from None
        return cls.adopt(fd, path)

    @classmethod
    def adopt(cls, fd: int, path: str) -> NetNS:
        """Take ownership of an fd someone handed us (the CNI plugin), once it proves to be a
        network namespace; closed on refusal."""
        try:
            kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError:
            kind = -1
        if kind != CLONE_NEWNET:
            os.close(fd)
            raise NetNSError(f"{path} is not a network namespace")
        return cls(fd, path)

    def dup(self) -> NetNS:
        """A second handle on the same namespace, closed independently."""
        return NetNS(os.dup(self.fd), self.path)

    @classmethod
    def current(cls) -> NetNS:
        return cls.open("/proc/thread-self/ns/net")

    def foreign_owner(self) -> int | None:
        """An fd of the user namespace that owns this network namespace when that is not ours (a
        `hostUsers: false` pod), else None. The caller closes the fd."""
        try:
            owner = fcntl.ioctl(self.fd, NS_GET_USERNS)
        except OSError as err:
            raise NetNSError(f"cannot find who owns network namespace {self.path}: {err.strerror}") from None
        try:
            ours = os.fstat(owner).st_ino == os.stat("/proc/self/ns/user").st_ino
        except OSError:
            os.close(owner)
            raise
        if ours:
            os.close(owner)
            return None
        return owner

    def user_namespaced(self) -> bool:
        """Whether a user namespace other than ours owns this network namespace."""
        owner = self.foreign_owner()
        if owner is not None:
            os.close(owner)
        return owner is not None

    def _enter(self) -> None:
        try:
            _setns(self.fd)
        except OSError as err:
            raise NetNSError(f"cannot enter network namespace {self.path}: {err.strerror}") from None

    @classmethod
    def of_process(cls) -> NetNS:
        """The process's own namespace: its main thread's, which NetNS.run never moves."""
        return cls.open("/proc/self/ns/net")

    def move_here(self) -> None:
        """Move the calling thread into this namespace for good: for a long-lived thread of ours
        that was started from a thread inside a pod's namespace (threads inherit it)."""
        self._enter()
        _inside.inode = None

    def run(self, fn: Callable[[], T], fresh: bool = False) -> T:
        """Run fn on a thread of its own that enters this namespace and ends with the call, so no
        thread outlives its work inside a pod's namespace. Processes fn starts live in the namespace.
        Called again from inside (a backend's steps within its apply), fn runs on the same thread:
        on a busy node each new thread waits for a CPU, and a sandbox's CNI ADD took several.
        `fresh`: a thread of its own all the same, for fn that moves its thread further (into
        another mount namespace)."""
        if not fresh and getattr(_inside, "inode", None) == self.inode:
            return fn()
        outcome: dict[str, Any] = {}

        def inside() -> None:
            try:
                self._enter()
                _inside.inode = None if fresh else self.inode  # fn may move a fresh thread further
                outcome["value"] = fn()
            except BaseException as err:  # handed to the caller, whatever it is
                outcome["error"] = err

        thread = threading.Thread(target=inside, name=f"netns-{self.inode}")
        thread.start()
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return cast(T, outcome["value"])

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> NetNS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
