"""A mount namespace in which /sys/fs/cgroup is an empty, read-only tmpfs, for listing rules.

`nft` prints a `cgroupsv2` value as the path it finds for the ID under /sys/fs/cgroup of its mount
namespace, by walking that whole tree for every value (on a hybrid host the cgroup v1 hierarchies
too, whose directories can carry the same numbers as v2 IDs), and as the bare ID when it finds
none. Listing from a thread that has entered this namespace gives IDs, always and at once, so
drift detection compares IDs exactly (netisolate.rules, CGROUP IDENTITY).

Each listing thread makes one of its own (unshare: ~0.1 ms) and ends with it. Entering one kept
for all (setns) would need CAP_SYS_CHROOT besides CAP_SYS_ADMIN, which the agent runs without: in
its container, every listing by ID failed that way.
"""

from __future__ import annotations

import ctypes
import os

CLONE_FS = 0x00000200
CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_REC, MS_PRIVATE = 0x1, 0x4000, 0x40000
CGROUP_ROOT = "/sys/fs/cgroup"  # where nft looks, compiled in


class BlindError(OSError):
    """The namespace cannot be made or entered here (no CAP_SYS_ADMIN, no /sys/fs/cgroup)."""


def check(result: int, what: str) -> None:
    """Raise BlindError for a libc call that failed (`result` not 0), naming `what`."""
    if result != 0:
        err = ctypes.get_errno()
        raise BlindError(err, f"{what}: {os.strerror(err)}")


_libc = ctypes.CDLL(None, use_errno=True)


def enter() -> None:
    """Move the calling thread (one that ends soon: NetNS.run's) into a mount namespace of its
    own in which /sys/fs/cgroup is an empty, read-only tmpfs (a thread can leave the process's
    mount namespace only after unsharing its filesystem context)."""
    check(_libc.unshare(CLONE_FS | CLONE_NEWNS), "unshare")
    check(_libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "making mounts private")
    check(_libc.mount(b"none", CGROUP_ROOT.encode(), b"tmpfs", MS_RDONLY, b"size=4k"), "mounting tmpfs")
