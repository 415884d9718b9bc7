"""The node's cgroup hierarchies as the agent sees them, and inotify on their directories.

Which mounts count: those that show a hierarchy whole, from its root. mountinfo and
/proc/PID/cgroup both name cgroups relative to the root of the agent's own cgroup namespace (`/..`
above it), so a process's cgroup is found under a mount by taking one path from the other
(`below`). A cgroup v2 hierarchy's root is the one directory without `cgroup.events` (only non-root
cgroups carry it); a v1 hierarchy's root is the one with `release_agent` (only the root carries it).
On a pure v2 node that is `/sys/fs/cgroup`; on a hybrid one `/sys/fs/cgroup/unified` plus a v1
hierarchy per controller; or the node's hierarchy mounted into the agent's container.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

# cgroup v1 mount options that are not controllers (name=… is kept: it names a hierarchy)
_V1_OPTIONS = {"rw", "ro", "all", "none", "noprefix", "clone_children", "xattr", "cpuset_v2_mode"}


@dataclass(frozen=True)
class Mount:
    root: str  # the mount's top, as a cgroup path (relative to our cgroup namespace)
    point: str
    controllers: frozenset[str] = frozenset()  # cgroup v1: what the hierarchy holds; v2: none

    @property
    def whole(self) -> bool:
        """The mount shows its hierarchy from the root (see above)."""
        if not os.path.isdir(self.point):
            return False
        if self.controllers:
            return os.path.exists(os.path.join(self.point, "release_agent"))
        return not os.path.exists(os.path.join(self.point, "cgroup.events"))


def _unescape(field: str) -> str:
    return field.replace("\\040", " ")


def cgroup_mounts(mountinfo: str) -> list[Mount]:
    """Every cgroup mount of a mountinfo file, v1 and v2, in its order."""
    mounts = []
    for line in mountinfo.splitlines():
        before, dash, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if not dash or len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        controllers = frozenset[str]()
        if tail[0] == "cgroup":
            options = tail[2].split(",")
            controllers = frozenset(
                o for o in options if o.startswith("name=") or ("=" not in o and o not in _V1_OPTIONS)
            )
            if not controllers:
                continue
        mounts.append(Mount(_unescape(fields[3]), _unescape(fields[4]), controllers))
    return mounts


def v2_mounts(mountinfo: str) -> list[Mount]:
    return [m for m in cgroup_mounts(mountinfo) if not m.controllers]


def whole_mounts(mountinfo: str) -> list[Mount]:
    """The mounts that show a hierarchy whole, one per hierarchy, cgroup v2 first."""
    seen: set[frozenset[str]] = set()
    found = []
    for mount in sorted(cgroup_mounts(mountinfo), key=lambda m: bool(m.controllers)):
        if mount.controllers not in seen and mount.whole:
            seen.add(mount.controllers)
            found.append(mount)
    return found


def below(path: str, root: str) -> list[str] | None:
    """The parts of cgroup `path` below `root` (both as the kernel prints them, `..` allowed), or
    None when path is not under root."""
    p = [part for part in path.split("/") if part]
    r = [part for part in root.split("/") if part]
    return p[len(r) :] if p[: len(r)] == r and ".." not in p[len(r) :] else None


IN_MODIFY, IN_CREATE, IN_DELETE, IN_IGNORED = 0x2, 0x100, 0x200, 0x8000
IN_ONLYDIR, IN_MASK_ADD, IN_CLOEXEC = 0x1000000, 0x20000000, 0x80000
_EVENT = struct.Struct("iIII")
# The files whose change means a process joined or left (a runtime writes cgroup.procs, or tasks on
# cgroup v1; cgroup.events changes with it): a running container's other files (memory.events
# under pressure, a systemd reload's rewrites) change often and wake no one.
_MEMBERSHIP = frozenset({b"cgroup.procs", b"cgroup.events", b"tasks"})


class Watch:
    """inotify on cgroup directories, each watched for one or more keys (pod UIDs): a change is
    reported within a millisecond as callback(key), with no polling. One thread reads all watches.
    A directory several pods wait on (a QoS level's, before their own cgroups exist) is one
    watch that wakes each of them."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.callback: Callable[[str], None] = lambda key: None
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = -1
        self._keys: dict[int, set[str]] = {}  # watch descriptor -> keys
        self._dirs: dict[str, dict[str, int]] = {}  # key -> {directory: watch descriptor}
        self._lock = threading.Lock()

    def add(self, key: str, directory: str, mask: int) -> None:
        with self._lock:
            if directory in self._dirs.get(key, {}):
                return
            if self._fd < 0:
                self._fd = self._libc.inotify_init1(IN_CLOEXEC)
                if self._fd < 0:
                    log.error(
                        "inotify unavailable: changes are seen by polling only", extra={"watch": self.name}
                    )
                    return
                threading.Thread(target=self._read, name=self.name, daemon=True).start()
            wd = self._libc.inotify_add_watch(self._fd, directory.encode(), mask | IN_ONLYDIR | IN_MASK_ADD)
            if wd < 0:
                return  # gone already (or not there yet): the caller looks again
            self._keys.setdefault(wd, set()).add(key)
            self._dirs.setdefault(key, {})[directory] = wd

    def watching(self, key: str) -> set[str]:
        with self._lock:
            return set(self._dirs.get(key, {}))

    def remove(self, key: str, directories: set[str] | None = None) -> None:
        """Stop watching for key (only these of its directories, when given)."""
        with self._lock:
            mine = self._dirs.get(key, {})
            for directory in list(mine) if directories is None else directories & set(mine):
                wd = mine.pop(directory)
                keys = self._keys.get(wd, set())
                keys.discard(key)
                if not keys and self._keys.pop(wd, None) is not None:
                    self._libc.inotify_rm_watch(self._fd, wd)
            if not mine:
                self._dirs.pop(key, None)

    def _forget(self, wd: int) -> None:
        for key in self._keys.pop(wd, set()):
            mine = self._dirs.get(key, {})
            for directory in [d for d, w in mine.items() if w == wd]:
                del mine[directory]
            if not mine:
                self._dirs.pop(key, None)

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self._fd, 65536)
            except OSError as err:
                log.error("inotify watch ended", extra={"watch": self.name, "error": str(err)})
                return
            changed: set[str] = set()
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                name = data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0")
                offset += _EVENT.size + length
                with self._lock:
                    if not mask & IN_MODIFY or name in _MEMBERSHIP:
                        changed |= self._keys.get(wd, set())
                    if mask & IN_IGNORED:  # the directory is gone: its descriptor may be reused
                        self._forget(wd)
            for key in changed:
                try:
                    self.callback(key)
                except Exception:  # one pod's trouble must not end the watch for every pod
                    log.exception("reacting to a cgroup change failed", extra={"pod_uid": key})
