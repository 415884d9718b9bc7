"""Pod UID → the pod's network namespace, on a real node, from /proc alone (hostPID).

Every container process of a pod sits in a cgroup whose path names the pod's UID, whatever the
layout: cgroup v1 or v2, systemd or cgroupfs driver, containerd or CRI-O:

    0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1f2e…_9a.slice/cri-containerd-<id>.scope
    4:memory:/kubepods/burstable/pod1f2e…-9a/<id>
    0::/kubepods.slice/kubepods-pod1f2e…_9a.slice/crio-<id>.scope
    0::/../../burstable/pod1f2e…-9a/<id>      (cgroup v2, cgroupfs driver, seen from the agent's
                                              own cgroup namespace: relative, no "kubepods")

A static pod's cgroup names its config hash (32 hex digits) rather than the UID of its mirror pod
in the API; the agent looks those up by the mirror pod's `kubernetes.io/config.mirror` annotation.

The parsing is pure; `scan` reads /proc; `Sandboxes` keeps one scan for a whole round of lookups
and is what the reconciler is handed. The namespace is taken from the oldest process (the
sandbox), never the host's own (CRI-O's conmon lives in the pod's cgroup but the host's netns),
and confirmed by the pod's IP where the pod has one.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute, NetlinkError  # imported up front: its first import costs ~130 ms

from netisolate.model import Pod
from netisolate.netns import NetNS, NetNSError

# A whole path part: `pod<uid>`, or a systemd slice `…-pod<uid_with_underscores>.slice`.
_POD_UID = re.compile(
    r"(?:^|/)(?:[\w.-]*-)?pod("
    r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
    r"|[0-9a-f]{32}"  # a static pod: its config hash
    r")(?:\.slice)?(?:/|$)"
)
MIRROR_ANNOTATION = "kubernetes.io/config.mirror"


def pod_uid_from_cgroup(text: str) -> str | None:
    """The pod UID (or static pod's config hash) named by a /proc/PID/cgroup file, or None for
    processes outside pods. A path counts when it is under kubepods, or relative (the agent's own
    cgroup namespace hides the kubepods root; with the cgroupfs driver nothing else names it)."""
    for line in text.splitlines():
        path = line.split(":", 2)[-1]
        if "kubepods" not in path and not path.startswith("/.."):
            continue
        match = _POD_UID.search(path)
        if match:
            return match[1].replace("_", "-")
    return None


@dataclass(frozen=True, order=True)
class Process:
    start: int  # clock ticks since boot: the oldest process of a pod is its sandbox
    pid: int


def _start_ticks(proc: Path) -> int:
    stat = (proc / "stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[19])


def scan(proc_root: str = "/proc", wanted: Iterable[str] | None = None) -> dict[str, list[Process]]:
    """{pod UID: its processes, oldest first}, optionally only for the wanted pods."""
    want = set(wanted) if wanted is not None else None
    found: dict[str, list[Process]] = {}
    for entry in os.scandir(proc_root):
        if not entry.name.isdigit():
            continue
        proc = Path(entry.path)
        try:
            uid = pod_uid_from_cgroup((proc / "cgroup").read_text())
            if uid is None or (want is not None and uid not in want):
                continue
            found.setdefault(uid, []).append(Process(_start_ticks(proc), int(entry.name)))
        except (OSError, ValueError, IndexError):  # the process exited while we looked
            continue
    return {uid: sorted(procs) for uid, procs in found.items()}


def netns_inodes(processes: list[Process], proc_root: str = "/proc") -> set[int]:
    """The network namespaces (by inode) the processes that still exist live in."""
    inodes = set()
    for process in processes:
        try:
            inodes.add(os.stat(f"{proc_root}/{process.pid}/ns/net").st_ino)
        except OSError:  # exited meanwhile
            continue
    return inodes


def _has_address(ns: NetNS, addresses: set[str]) -> bool:
    def read() -> set[str]:
        with IPRoute() as ipr:
            return {
                a.get_attr("IFA_ADDRESS")
                for a in ipr.get_addr()
                if a["family"] in (socket.AF_INET, socket.AF_INET6)
            }

    return bool(ns.run(read) & addresses)


def find_netns(
    processes: list[Process], host_inode: int, pod_ips: set[str], proc_root: str = "/proc"
) -> NetNS | None:
    """The pod's namespace: the oldest process's that is not the host's and holds the pod IP (when
    the pod has one yet). The returned NetNS keeps the namespace open by fd."""
    seen: set[int] = set()
    for process in processes:
        try:
            ns = NetNS.open(f"{proc_root}/{process.pid}/ns/net")
        except NetNSError:
            continue
        if ns.inode == host_inode or ns.inode in seen:
            ns.close()
            continue
        seen.add(ns.inode)
        try:
            if not pod_ips or _has_address(ns, pod_ips):
                return ns
        except (OSError, NetNSError, NetlinkError):  # it went away while we looked: not this one
            pass
        ns.close()
    return None


RESCAN_MISSING_S = 0.002  # a pod the scan lacks is looked for in a fresh one, at most this often
SCAN_MAX_AGE_S = 1.0  # no lookup is answered from an older scan


class Sandboxes:
    """Each pod's sandbox on this node, from /proc: its network namespace, and whether the pod's
    processes have left it (the sandbox was recreated). One /proc scan serves every lookup within a
    moment, so a round over hundreds of pods reads /proc once, not once per pod."""

    def __init__(self, host_inode: int, proc_root: str = "/proc") -> None:
        self.host_inode, self.proc_root = host_inode, proc_root
        # (when, what): one tuple, replaced whole, because the reconciler looks up pods from
        # several threads at once while it adopts a full pod list
        self._scan: tuple[float, dict[str, list[Process]]] = (0.0, {})

    def find(self, pod: Pod) -> NetNS | None:
        """The pod's network namespace (kept open by fd), or None while its sandbox does not exist."""
        ips = {ip.ip for ip in pod.status.pod_ips} if pod.status else set()
        return find_netns(self._processes(pod, look_again=True), self.host_inode, ips, self.proc_root)

    def moved(self, pod: Pod, ns: NetNS) -> bool:
        """The pod's processes live in other namespaces than ns: its sandbox was recreated."""
        inodes = set[int]()
        for look_again in (False, True):  # a scan from before a new sandbox shows only dead processes
            processes = self._processes(pod, look_again=look_again)
            inodes = netns_inodes(processes, self.proc_root) - {self.host_inode}
            if inodes:
                break
            self._scan = (0.0, self._scan[1])  # stale: the second pass scans afresh
        return bool(inodes) and ns.inode not in inodes

    def cgroup(self, pod: Pod) -> str | None:
        """The cgroup v2 path (as /proc shows it) of the pod's sandbox: its oldest process's."""
        for process in self._processes(pod, look_again=True):
            try:
                text = Path(f"{self.proc_root}/{process.pid}/cgroup").read_text()
            except OSError:  # exited meanwhile
                continue
            for line in text.splitlines():
                if line.startswith("0::"):
                    return line[3:]
            return None
        return None

    def _processes(self, pod: Pod, look_again: bool) -> list[Process]:
        # With look_again, a pod the scan does not show is looked for in a fresh one, so a sandbox
        # that just appeared is never hidden by the cache.
        uid = pod.metadata.annotations.get(MIRROR_ANNOTATION) or pod.metadata.uid or ""
        stamp, found = self._scan
        age = time.monotonic() - stamp
        if (look_again and uid not in found and age > RESCAN_MISSING_S) or age > SCAN_MAX_AGE_S:
            found = scan(self.proc_root)
            self._scan = (time.monotonic(), found)
        return found.get(uid, [])
