"""Pod UID → the pod's network namespace, on a real node (hostPID, the node's cgroups mounted).

Every container process of a pod sits in a cgroup whose path names the pod's UID, whatever the
layout: cgroup v1 or v2, systemd or cgroupfs driver, containerd or CRI-O:

    0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1f2e…_9a.slice/cri-containerd-<id>.scope
    4:memory:/kubepods/burstable/pod1f2e…-9a/<id>
    0::/kubepods.slice/kubepods-pod1f2e…_9a.slice/crio-<id>.scope
    0::/../../burstable/pod1f2e…-9a/<id>      (cgroup v2, cgroupfs driver, seen from the agent's
                                              own cgroup namespace: relative, no "kubepods")

A static pod's cgroup names its config hash (32 hex digits) rather than the UID of its mirror pod
in the API; the agent looks those up by the mirror pod's `kubernetes.io/config.mirror` annotation.

The agent knows each pod's UID and QoS class, so it reads the pod's processes from the pod's own
cgroup, where the kubelet puts it (`pod_cgroup_dirs`); scanning every process of /proc is the
fallback for layouts it does not know (`Sandboxes`). The parsing is pure; `scan` reads /proc. The
namespace is taken from the oldest process (the sandbox), never the host's own (CRI-O's conmon
lives in the pod's cgroup but the host's netns), and confirmed by the pod's IP where the pod has
one.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from netisolate.agent.hierarchy import IN_CREATE, IN_MODIFY, Watch, below, whole_mounts
from netisolate.model import Pod
from netisolate.netns import NetNS, NetNSError

log = logging.getLogger(__name__)

# A path part: `pod<uid>`, or a systemd slice `…-pod<uid_with_underscores>.slice`.
_PART = (
    r"(?:[\w.-]*-)?pod("
    r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
    r"|[0-9a-f]{32}"  # a static pod: its config hash
    r")(?:\.slice)?"
)
_POD_PART = re.compile(_PART)
_POD_UID = re.compile(rf"(?:^|/){_PART}(?:/|$)")  # a whole path part
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


def local_addresses(fib_trie: str, if_inet6: str) -> set[str]:
    """A network namespace's own addresses, from its /proc/net/fib_trie (IPv4: the `host LOCAL`
    entries) and /proc/net/if_inet6 (IPv6), in ipaddress' compressed form."""
    found, last = set(), ""
    for line in fib_trie.splitlines():
        text = line.strip()
        if text.startswith(("|--", "+--")):
            last = text.split()[1]
        elif text.endswith(" host LOCAL") and last:
            found.add(last)
    for line in if_inet6.splitlines():
        fields = line.split()
        if fields and len(fields[0]) == 32:
            found.add(ipaddress.IPv6Address(int(fields[0], 16)).compressed)
    return found


def pod_addresses(pod: Pod) -> set[str]:
    """The pod's IPs as local_addresses writes them (what the kubelet posts is not checked: an
    address that does not parse cannot confirm a namespace and is left out)."""
    found = set()
    for ip in pod.status.pod_ips if pod.status else []:
        with contextlib.suppress(ValueError):
            found.add(ipaddress.ip_address(ip.ip).compressed)
    return found


def _holds(proc_root: str, pid: int, ns: NetNS, addresses: set[str]) -> bool:
    """Whether namespace ns, opened from process pid, holds one of the addresses: read from the
    process's own view of /proc/net (no setns, no netlink), then checked to still be ns's."""
    net = f"{proc_root}/{pid}/net"
    with open(f"{net}/fib_trie") as trie:
        fib_trie = trie.read()
    try:
        with open(f"{net}/if_inet6") as inet6:
            if_inet6 = inet6.read()
    except FileNotFoundError:  # IPv6 off in the namespace
        if_inet6 = ""
    if os.stat(f"{proc_root}/{pid}/ns/net").st_ino != ns.inode:  # it moved, or the PID was reused
        return False
    return bool(local_addresses(fib_trie, if_inet6) & addresses)


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
            if not pod_ips or _holds(proc_root, process.pid, ns, pod_ips):
                return ns
        except OSError:  # it went away while we looked: not this one
            pass
        ns.close()
    return None


# --- where the kubelet puts a pod's cgroup ------------------------------------------------------

QOS_LEVELS = {"Guaranteed": "", "Burstable": "burstable", "BestEffort": "besteffort"}
ROOT_NAMES = ("kubepods", "kubepods.slice")  # the kubelet's default, either driver


def pod_cgroup_dirs(root: str, uid: str, qos_class: str | None = None) -> list[str]:
    """Where the kubelet puts a pod's cgroup below a kubepods root directory, the pod's QoS class
    first when known (a Guaranteed pod has no level of its own):

        cgroupfs driver:  <root>/[<qos>/]pod<uid>
        systemd driver:   <R>.slice/[<R>-<qos>.slice/]<R>[-<qos>]-pod<uid with _ for ->.slice
    """
    first = QOS_LEVELS.get(qos_class or "")
    levels = sorted(QOS_LEVELS.values(), key=lambda level: level != first)
    name = os.path.basename(root)
    if not name.endswith(".slice"):
        return [os.path.join(root, level, f"pod{uid}") for level in levels]
    prefix, escaped = name.removesuffix(".slice"), uid.replace("-", "_")
    return [
        os.path.join(root, f"{prefix}-{level}.slice", f"{prefix}-{level}-pod{escaped}.slice")
        if level
        else os.path.join(root, f"{prefix}-pod{escaped}.slice")
        for level in levels
    ]


def kubepods_root(path: str) -> list[str] | None:
    """The parts of a pod's cgroup path above its QoS level (the kubepods root: `kubelet.slice`,
    `kubelet-kubepods.slice` on a kind node), or None when the path names no pod."""
    parts = [part for part in path.split("/") if part]
    for i, part in enumerate(parts):
        if _POD_PART.fullmatch(part):
            above = parts[:i]
            qos = above[-1] if above else ""
            if qos in QOS_LEVELS.values() or qos.endswith(("-burstable.slice", "-besteffort.slice")):
                above = above[:-1]
            return above or None
    return None


def cgroup_pids(directory: str) -> list[int]:
    """The processes of a cgroup and of the cgroups below it (a pod's containers' are its children)."""
    pids: list[int] = []
    try:
        with open(os.path.join(directory, "cgroup.procs")) as procs:
            pids += [int(line) for line in procs.read().split() if line.isdigit()]
    except OSError:  # removed meanwhile
        pass
    try:
        children = [e.path for e in os.scandir(directory) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return pids
    for child in children:
        pids += cgroup_pids(child)
    return pids


def processes(pids: Iterable[int], proc_root: str = "/proc") -> list[Process]:
    """The processes that still exist, oldest first."""
    found = []
    for pid in pids:
        try:
            found.append(Process(_start_ticks(Path(f"{proc_root}/{pid}")), pid))
        except (OSError, ValueError, IndexError):  # exited meanwhile
            continue
    return sorted(found)


RESCAN_MISSING_S = 0.002  # layout unknown: a pod the scan lacks is looked for in a fresh one this often
SCAN_MAX_AGE_S = 1.0  # no lookup is answered from an older scan
FALLBACK_AFTER_S = 5.0  # a pod's cgroup missing from every layout this long: /proc is scanned for it
FALLBACK_EVERY_S = 5.0  # (at most this often, for each such pod)


class Sandboxes:
    """Each pod's sandbox on this node: its network namespace, and whether the pod's processes have
    left it (the sandbox was recreated).

    A pod's processes are read from its own cgroup (`cgroup.procs` of the pod's cgroup and its
    containers'), which the kubelet puts in one of a few places (pod_cgroup_dirs) below a kubepods
    root of any hierarchy the agent sees whole. While a pod waits for its sandbox, inotify on
    those directories wakes the reconciler the moment its cgroups appear and fill (cgroup v2;
    cgroup v1 has no such events, and the reconciler's polling finds them); while it runs, on its
    own cgroup's, so a sandbox recreated without a word from the runtime (no CNI plugin) is met
    at once, not at the next verification round.

    Scanning every process's cgroup in /proc is the fallback, logged: on a node where no kubepods
    root is found (a layout the agent does not know), and for a pod whose cgroup has been missing
    from the known layout for FALLBACK_AFTER_S (a kubelet with its own --cgroup-root); a root such
    a scan finds is then looked in directly. One scan serves every lookup within a moment."""

    def __init__(
        self, host_inode: int, proc_root: str = "/proc", mountinfo: str = "/proc/self/mountinfo"
    ) -> None:
        self.host_inode, self.proc_root = host_inode, proc_root
        try:
            with open(mountinfo) as info:
                self.mounts = whole_mounts(info.read())
        except OSError as err:
            log.warning(
                "cannot read the cgroup mounts: sandboxes are found by scanning /proc",
                extra={"mountinfo": mountinfo, "error": err.strerror},
            )
            self.mounts = []
        # kubepods roots found by a /proc scan (directories); replaced whole, read by many threads
        self._learned: frozenset[str] = frozenset()
        self._missing_since: dict[str, float] = {}  # pod UID -> since when its cgroup is not found
        self._fallback_at: dict[str, float] = {}  # pod UID -> when a scan last looked for it
        self._said_unknown = False
        self._watch = Watch("sandbox-watch")
        # (when, what): one tuple, replaced whole, because the reconciler looks up pods from
        # several threads at once while it adopts a full pod list
        self._scan: tuple[float, dict[str, list[Process]]] = (0.0, {})

    def on_change(self, callback: Callable[[str], None]) -> None:
        """callback(pod UID) when a pod still waiting for its sandbox may have one now."""
        self._watch.callback = callback

    def find(self, pod: Pod) -> NetNS | None:
        """The pod's network namespace (kept open by fd), or None while its sandbox does not exist.
        Its cgroups stay watched either way (see `moved`)."""
        ips = pod_addresses(pod)
        ns = find_netns(self._processes(pod, look_again=True), self.host_inode, ips, self.proc_root)
        if ns is None:
            self._wait_for(pod, self.roots())
            return None
        uid = pod.metadata.uid or pod.ref
        self._missing_since.pop(uid, None)
        self._fallback_at.pop(uid, None)
        self._wait_for(pod, self.roots()[:1])
        return ns

    def moved(self, pod: Pod, ns: NetNS) -> bool:
        """The pod's processes live in other namespaces than ns: its sandbox was recreated. The
        pod's cgroups stay watched while it runs, so a new sandbox (its containers' cgroups
        created, then filled) wakes the reconciler at once, not at its next verification round."""
        # The cgroups as they are now (a new sandbox's are new directories), watched before they
        # are read, so what changes after the read wakes us; in the first hierarchy only (v2 where
        # there is one): every hierarchy holds the pod's processes, and a v1 node has a dozen.
        self._wait_for(pod, self.roots()[:1])
        inodes = set[int]()
        for look_again in (False, True):  # a scan from before a new sandbox shows only dead processes
            procs = self._processes(pod, look_again=look_again)
            inodes = netns_inodes(procs, self.proc_root) - {self.host_inode}
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

    def forget(self, uid: str) -> None:
        """The pod is gone: stop watching its cgroups."""
        self._watch.remove(uid)
        self._missing_since.pop(uid, None)
        self._fallback_at.pop(uid, None)

    # --- where a pod's processes are --------------------------------------------------------------

    def roots(self) -> list[str]:
        """The kubepods roots that exist, in every hierarchy seen whole (cgroup v2 first)."""
        found = [os.path.join(m.point, name) for m in self.mounts for name in ROOT_NAMES]
        return [root for root in [*found, *sorted(self._learned)] if os.path.isdir(root)]

    def _candidates(self, pod: Pod, roots: list[str]) -> list[str]:
        qos = pod.status.qos_class if pod.status else None
        return [d for root in roots for d in pod_cgroup_dirs(root, _key(pod), qos)]

    def _processes(self, pod: Pod, look_again: bool) -> list[Process]:
        roots = self.roots()
        if not roots:
            if not self._said_unknown:
                self._said_unknown = True
                log.warning(
                    "no kubepods cgroup found in the cgroup hierarchies the agent sees: sandboxes "
                    "are found by scanning every process's cgroup in /proc (slower); mount the "
                    "node's /sys/fs/cgroup into the agent",
                    extra={"hierarchies": [m.point for m in self.mounts]},
                )
            return self._scanned(_key(pod), look_again)
        self._said_unknown = False
        existing = [d for d in self._candidates(pod, roots) if os.path.isdir(d)]
        for directory in existing:  # every hierarchy holds it; the first with processes says
            found = processes(cgroup_pids(directory), self.proc_root)
            if found:
                return found
        if existing or not look_again:
            return []
        return self._fallback(pod)

    def _fallback(self, pod: Pod) -> list[Process]:
        """The pod's cgroup is in none of the places the kubelet's layout puts it: after a while,
        look for it in all of /proc, and learn its kubepods root from what is found."""
        uid, now = pod.metadata.uid or pod.ref, time.monotonic()
        since = self._missing_since.setdefault(uid, now)
        if now - since < FALLBACK_AFTER_S or now - self._fallback_at.get(uid, 0.0) < FALLBACK_EVERY_S:
            return []
        self._fallback_at[uid] = now
        log.warning(
            "the pod's cgroup is not where the kubelet puts it; scanning /proc for it",
            extra={"pod": pod.ref, "looked_in": self.roots(), "missing_s": round(now - since, 1)},
        )
        found = self._scanned(_key(pod), look_again=True)
        learned = self._learn(found)
        if learned:
            log.warning(
                "found the pod's cgroup by a /proc scan, below a kubepods root the agent did not "
                "know; looking there directly from now on",
                extra={"pod": pod.ref, "roots": sorted(learned)},
            )
        return found

    def _learn(self, found: list[Process]) -> set[str]:
        """The kubepods roots (as directories of hierarchies seen whole) of found's cgroups."""
        learned = set()
        for process in found[:1]:
            try:
                text = Path(f"{self.proc_root}/{process.pid}/cgroup").read_text()
            except OSError:
                continue
            for line in text.splitlines():
                fields = line.split(":", 2)
                root = kubepods_root(fields[-1])
                held = frozenset(fields[1].split(",")) - {""} if len(fields) == 3 else None
                for mount in [m for m in self.mounts if m.controllers == held] if root else []:
                    parts = below("/" + "/".join(root or []), mount.root)
                    if parts:
                        learned.add(os.path.join(mount.point, *parts))
        new = learned - self._learned
        self._learned = self._learned | learned
        return new

    def _scanned(self, uid: str, look_again: bool) -> list[Process]:
        # With look_again, a pod the scan does not show is looked for in a fresh one, so a sandbox
        # that just appeared is never hidden by the cache.
        stamp, found = self._scan
        age = time.monotonic() - stamp
        if (look_again and uid not in found and age > RESCAN_MISSING_S) or age > SCAN_MAX_AGE_S:
            found = scan(self.proc_root)
            self._scan = (time.monotonic(), found)
        return found.get(uid, [])

    def _wait_for(self, pod: Pod, roots: list[str]) -> None:
        """inotify on where the pod's cgroups will appear: the QoS levels' directories until the
        pod's own exists, then it and its containers' (the runtime's write of a process into a
        container's `cgroup.procs` says when one joins; `cgroup.events` says nothing to a watch
        until someone has opened it)."""
        uid = pod.metadata.uid or pod.ref
        existing = [d for d in self._candidates(pod, roots) if os.path.isdir(d)]
        if existing:
            wanted = {(d, IN_CREATE) for d in existing}
            for directory in existing:
                with contextlib.suppress(OSError):
                    wanted |= {
                        (e.path, IN_MODIFY) for e in os.scandir(directory) if e.is_dir(follow_symlinks=False)
                    }
        else:
            parents = {os.path.dirname(d) for d in self._candidates(pod, roots)}
            wanted = {(d, IN_CREATE) for d in parents if os.path.isdir(d)}
        self._watch.remove(uid, self._watch.watching(uid) - {d for d, _ in wanted})
        for directory, mask in wanted:
            self._watch.add(uid, directory, mask)


def _key(pod: Pod) -> str:
    """What the pod's cgroup is named by: its UID, or a static pod's config hash."""
    return pod.metadata.annotations.get(MIRROR_ANNOTATION) or pod.metadata.uid or ""
