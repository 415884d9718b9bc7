"""nftables with the socket guard: the agent's backend under `--socket-guard`.

A pod the guard can serve as netfilter would (netisolate.rules.sockaddr.unfit: cgroup identity,
its pod's cgroup known, no UDP grant, enforce, port-forward allowed) and whose namespace holds no
NAT (a nat table or chain would send a connection somewhere else than the address the guard
judged) is judged by the guard alone: its declared ports are reserved in the namespace (the kernel
never picks one for an unbound socket), its programs are attached to the pod's cgroup, then the
pod's nftables table is deleted, so no packet of the pod meets a netfilter hook of ours. Every
other pod keeps its table. A pod moves between the two without a moment unguarded: the new one
is in place before the old one goes. The CNI ADD's table (the pod's cgroup is not known before
its sandbox runs) is replaced by the guard once the sandbox's cgroup is seen.

Verification reads the kernel: our program at every attach point of the pod's cgroup, every map
exactly as the policy wants, and the namespace's `local` routing table and NAT as they are now —
an address that appeared or a nat rule that was added is drift, which the next apply settles.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from netisolate.backends import bpf, libnft, sysctl
from netisolate.backends.base import EnforceError, Inspection, checked, run_tool
from netisolate.backends.nftables import NftablesBackend
from netisolate.netns import NetNS
from netisolate.rules import RuleSet, nft, sockaddr

CGROUPFS = "/sys/fs/cgroup"  # where rules' cgroup paths are relative to, as for nft


@dataclass
class _Entry:
    directory: str
    installed: bpf.Installed
    guard: sockaddr.Guard


def nat_in(ns: NetNS) -> str | None:
    """What NAT the namespace holds (None: none). Legacy tables are looked up by name, never
    opened: opening one would make it, and a nat table brings conntrack with it."""

    def inside() -> str | None:
        for family, names in ((4, "ip_tables_names"), (6, "ip6_tables_names")):
            path = Path("/proc/thread-self/net") / names
            if path.exists() and "nat" in path.read_text().split():
                return f"a legacy iptables nat table (IPv{family})"
        if libnft.available():
            status, out, err = libnft.run("list ruleset")
        else:
            result = run_tool(None, ["nft", "list", "ruleset"])
            status, out, err = result.returncode, result.stdout, result.stderr
        if status != 0:
            raise EnforceError(f"cannot list the namespace's nftables ruleset: {err.strip()}")
        return "an nftables nat chain" if "type nat hook" in out else None

    return ns.run(inside)


_RESERVED = "/proc/sys/net/ipv4/ip_local_reserved_ports"  # per namespace, IPv6 included


def _ports(text: str) -> set[int]:
    """The ports of a reserved-ports list (`8080,15000-15001`)."""
    found: set[int] = set()
    for part in filter(None, text.strip().split(",")):
        low, _, high = part.partition("-")
        found.update(range(int(low), int(high or low) + 1))
    return found


def reserved(ns: NetNS) -> set[int]:
    """The ports the kernel never picks itself in the namespace (for an unbound socket's
    connect, listen or send)."""
    return ns.run(lambda: _ports(Path(_RESERVED).read_text()))


def reserve(ns: NetNS, ports: set[int]) -> None:
    """Add `ports` to what the namespace reserves (what the pod reserved itself stays): the guard
    judges bind(), and this keeps the kernel from handing a declared port to anyone."""

    have = reserved(ns)
    if ports <= have:
        return
    value = ",".join(map(str, sorted(have | ports)))
    try:  # a thread of its own: the write may have to remount /proc/sys in a mount namespace of its own
        ns.run(lambda: sysctl.write(_RESERVED, value), fresh=True)
    except OSError as err:
        raise EnforceError(f"cannot reserve the declared ports in the pod's namespace: {err}") from None


class GuardedBackend:
    name = "nftables+guard"
    cgroups = True

    def __init__(self, inner: NftablesBackend | None = None, cgroupfs: str = CGROUPFS) -> None:
        self.inner = inner or NftablesBackend()
        self.cgroupfs = cgroupfs
        self._guards: dict[int, _Entry] = {}  # namespace inode -> the guard we attached for it
        self._lock = threading.Lock()

    def unfit(self, ns: NetNS, ruleset: RuleSet) -> str | None:
        """Why this pod keeps its nftables table (None: the guard serves it)."""
        return sockaddr.unfit(ruleset) or nat_in(ns)

    def _directory(self, ruleset: RuleSet) -> str:
        assert ruleset.cgroups is not None and ruleset.cgroups.pod is not None
        return os.path.join(self.cgroupfs, ruleset.cgroups.pod.path)

    def _sweep(self) -> None:
        """Let go of the guards of pods whose cgroup is gone (the kernel detached them with it)."""
        for inode, entry in list(self._guards.items()):
            if not os.path.isdir(entry.directory):
                entry.installed.close()
                del self._guards[inode]

    def apply(self, ns: NetNS, ruleset: RuleSet) -> None:
        with self._lock:
            self._sweep()
            reason = self.unfit(ns, ruleset)
            if reason is None:
                self._guard(ns, ruleset)
                if self.inner.installed(ns):  # the guard holds: our hooks leave the packet path
                    checked(run_tool(ns, ["nft", "delete", "table", "inet", nft.TABLE]), "nft delete table")
                return
            self.inner.apply(ns, ruleset)
            entry = self._guards.pop(ns.inode, None)
            if entry is not None:  # the table holds: the guard can go
                entry.installed.detach()

    def _guard(self, ns: NetNS, ruleset: RuleSet) -> None:
        directory, guard = self._directory(ruleset), sockaddr.guard(ruleset)
        reserve(ns, _declared(ruleset))  # before the guard: no moment a squatter is handed one
        local4, local6 = bpf.local_addresses(ns)
        entry = self._guards.get(ns.inode)
        if entry is not None and entry.directory == directory and entry.installed.whole():
            entry.installed.update(guard, local4, local6)
            entry.guard = guard
            return
        installed = bpf.install(directory, guard, local4, local6)
        installed.detach_others()  # ours is whole: an earlier one (a restarted agent's) goes
        if entry is not None:
            entry.installed.close()  # (detached by detach_others where it was still attached)
        self._guards[ns.inode] = _Entry(directory, installed, guard)

    def update_cgroups(self, ns: NetNS, ruleset: RuleSet, installed: RuleSet) -> None:
        if ns.inode in self._guards or self.unfit(ns, ruleset) is None:
            self.apply(ns, ruleset)  # element updates of the guard's maps, or a move either way
        else:
            self.inner.update_cgroups(ns, ruleset, installed)

    def verify(self, ns: NetNS, ruleset: RuleSet) -> list[str]:
        return self.inspect(ns, ruleset).drift

    def inspect(self, ns: NetNS, ruleset: RuleSet) -> Inspection:
        with self._lock:
            self._sweep()
            entry, reason = self._guards.get(ns.inode), self.unfit(ns, ruleset)
            if reason is None:
                if entry is None or entry.directory != self._directory(ruleset):
                    return Inspection([f"the socket guard is not attached to {self._directory(ruleset)}"], {})
                drift = entry.installed.drift(sockaddr.guard(ruleset), *bpf.local_addresses(ns))
                unreserved = _declared(ruleset) - reserved(ns)
                drift += [f"declared port {p} is not reserved in the namespace" for p in sorted(unreserved)]
                return Inspection(drift, entry.installed.refused(entry.guard), entry.installed.observed())
        inspection = self.inner.inspect(ns, ruleset)
        if entry is not None:
            inspection.drift.append(f"the socket guard is attached, but the pod needs its table: {reason}")
        return inspection

    def installed(self, ns: NetNS) -> bool:
        return ns.inode in self._guards or self.inner.installed(ns)

    def deny_counters(self, ns: NetNS) -> dict[str, int]:
        entry = self._guards.get(ns.inode)
        return entry.installed.refused(entry.guard) if entry is not None else self.inner.deny_counters(ns)


def _declared(ruleset: RuleSet) -> set[int]:
    return {owner.port for owner in ruleset.cgroups.owners} if ruleset.cgroups is not None else set()
