"""A mount namespace in which /sys/fs/cgroup is an empty, read-only tmpfs, for listing rules.

`nft` prints a `cgroupsv2` value as the path it finds for the ID under /sys/fs/cgroup of its mount
namespace, by walking that whole tree for every value (on a hybrid host the cgroup v1 hierarchies
too, whose directories can carry the same numbers as v2 IDs), and as the bare ID when it finds
none. Listing from a thread that has entered this namespace gives IDs, always and at once, so
drift detection compares IDs exactly (netisolate.rules, CGROUP IDENTITY).

The namespace is made once, on a short-lived thread (a thread can leave the process's mount
namespace only after unsharing its filesystem context), and kept alive by an fd of it.
"""

from __future__ import annotations

import ctypes
import os
import threading
from functools import cache

CLONE_FS = 0x00000200
CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_REC, MS_PRIVATE = 0x1, 0x4000, 0x40000
CGROUP_ROOT = "/sys/fs/cgroup"  # where nft looks, compiled in


class BlindError(OSError):
    """The namespace cannot be made or entered here (no CAP_SYS_ADMIN, no /sys/fs/cgroup)."""


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise BlindError(err, f"{what}: {os.strerror(err)}")


_libc = ctypes.CDLL(None, use_errno=True)


def _make() -> int:
    _check(_libc.unshare(CLONE_FS | CLONE_NEWNS), "unshare")
    _check(_libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "making mounts private")
    _check(_libc.mount(b"none", CGROUP_ROOT.encode(), b"tmpfs", MS_RDONLY, b"size=4k"), "mounting tmpfs")
    return os.open("/proc/thread-self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)


@cache
def _namespace() -> int:
    outcome: dict[str, int | BaseException] = {}

    def make() -> None:
        try:
            outcome["fd"] = _make()
        except OSError as err:
            outcome["error"] = err

    thread = threading.Thread(target=make, name="cgroup-blind-mountns")
    thread.start()
    thread.join()
    fd = outcome.get("fd")
    if not isinstance(fd, int):
        error = outcome.get("error")
        raise BlindError(0, f"cannot make a mount namespace without cgroups: {error}")
    return fd


def enter() -> None:
    """Move the calling thread (one that ends soon: NetNS.run's) into the blind namespace."""
    fd = _namespace()
    _check(_libc.unshare(CLONE_FS), "unshare")
    _check(_libc.setns(fd, CLONE_NEWNS), "entering the mount namespace")
