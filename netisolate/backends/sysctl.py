"""Writing a sysctl of a pod's network namespace from the agent's container, whose /proc/sys the
runtime mounts read-only.

A network sysctl file shows the namespace of the thread that opens it, so a thread that entered
the pod's namespace (NetNS.run) writes the pod's. Where /proc/sys is read-only, that thread first
moves into a mount namespace of its own (CAP_SYS_ADMIN, as netisolate.backends.blind) and
remounts /proc/sys writable there: the agent's own mounts are untouched. Call it on a fresh
thread (`NetNS.run(..., fresh=True)`), which ends with that mount namespace.
"""

from __future__ import annotations

import ctypes
import errno
from pathlib import Path

from netisolate.backends.blind import CLONE_FS, CLONE_NEWNS, MS_PRIVATE, MS_REC, check

MS_REMOUNT, MS_BIND = 0x20, 0x1000
_libc = ctypes.CDLL(None, use_errno=True)


def write(path: str, value: str) -> None:
    """Write `value` to the sysctl file `path` of the calling thread's network namespace."""
    try:
        Path(path).write_text(value)
        return
    except OSError as err:
        if err.errno != errno.EROFS:
            raise
    check(_libc.unshare(CLONE_FS | CLONE_NEWNS), "unshare (to write a pod's sysctl)")
    check(_libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "making mounts private")
    check(_libc.mount(None, b"/proc/sys", None, MS_REMOUNT | MS_BIND, None), "remounting /proc/sys writable")
    Path(path).write_text(value)
