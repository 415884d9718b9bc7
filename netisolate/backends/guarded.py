"""nftables with the socket guard: the agent's backend under `--socket-guard`.

A pod the guard can serve as netfilter would (netisolate.rules.sockaddr.unfit: cgroup identity,
its pod's cgroup known, no UDP grant, enforce, port-forward allowed), whose namespace holds no NAT
(a nat table or chain would send a connection somewhere else than the address the guard judged)
and whose cgroup no other program judges connects on (a socket load-balancer's rewrite would do
the same) is judged by the guard alone: its declared ports are reserved in the namespace (the
kernel never picks one for an unbound socket), its programs are attached to the pod's cgroup,
then the pod's nftables table is deleted, so no packet of the pod meets a netfilter hook of ours.
Every other pod keeps its table. A pod moves between the two without a moment unguarded: the new
one is in place before the old one goes, and a guard that fails to go in leaves the pod on its
table. The CNI ADD's table (the pod's cgroup is not known before its sandbox runs) is replaced by
the guard once the sandbox's cgroup is seen. A pod moves from its table to the guard only while
every socket on a declared port is its owner's: the table keeps a squatter from receiving, the
guard only from binding.

Verification reads the kernel: our program at every attach point of the pod's cgroup and no other
of ours, every map exactly as the policy wants, NAT, other programs and reserved ports as they
are now. The local routes are refreshed on every round (an address that appeared is the
namespace changing, not drift).
"""

from __future__ import annotations

import logging
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
_RESERVED = "/proc/sys/net/ipv4/ip_local_reserved_ports"  # per namespace, IPv6 included
log = logging.getLogger(__name__)


@dataclass
class _Entry:
    inode: int  # the namespace it was attached for
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
        if libnft.available():  # chains only: no set elements, no cgroup paths to look up
            status, out, err = libnft.run("list chains")
        else:
            result = run_tool(None, ["nft", "list", "chains"])
            status, out, err = result.returncode, result.stdout, result.stderr
        if status != 0:
            raise EnforceError(f"cannot list the namespace's nftables chains: {err.strip()}")
        return "an nftables nat chain" if "type nat hook" in out else None

    return ns.run(inside)


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
    try:  # a thread of its own: the write may remount /proc/sys in a mount namespace of its own
        ns.run(lambda: sysctl.write(_RESERVED, value), fresh=True)
    except OSError as err:
        raise EnforceError(f"cannot reserve the declared ports in the pod's namespace: {err}") from None


def _held(ns: NetNS, ports: set[tuple[str, int]]) -> dict[int, tuple[str, int]]:
    """{socket inode: (protocol, port)} of the namespace's TCP listeners and UDP sockets on `ports`."""

    def inside() -> dict[int, tuple[str, int]]:
        found = {}
        for protocol, files in (("tcp", ("tcp", "tcp6")), ("udp", ("udp", "udp6"))):
            for name in files:
                lines = (Path("/proc/thread-self/net") / name).read_text().splitlines()[1:]
                for line in lines:
                    fields = line.split()
                    port, state, inode = int(fields[1].rsplit(":", 1)[1], 16), fields[3], int(fields[9])
                    if (protocol, port) in ports and (protocol == "udp" or state == "0A"):
                        found[inode] = (protocol, port)
        return found

    return ns.run(inside)


def squatters(ns: NetNS, ruleset: RuleSet, cgroupfs: str, proc: str = "/proc") -> list[str]:
    """Sockets on a declared port that no owner holds (`protocol/port`): the guard, which judges
    bind(), cannot take over from the table while one is bound."""
    assert ruleset.cgroups is not None
    owners: dict[tuple[str, int], set[str]] = {
        (o.protocol, o.port): set(o.members) for o in ruleset.cgroups.owners
    }
    held = _held(ns, set(owners))
    if not held:
        return []
    holder: dict[int, str] = {}
    for member in ruleset.cgroups.members:
        if member.cgroup is None:
            continue
        try:
            pids = Path(cgroupfs, member.cgroup.path, "cgroup.procs").read_text().split()
        except OSError:
            continue
        for pid in pids:
            try:
                links = [os.readlink(f"{proc}/{pid}/fd/{fd}") for fd in os.listdir(f"{proc}/{pid}/fd")]
            except OSError:
                continue
            holder.update({int(link[8:-1]): member.name for link in links if link.startswith("socket:[")})
    return [
        f"{protocol}/{port}"
        for inode, (protocol, port) in sorted(held.items(), key=lambda item: item[1])
        if holder.get(inode) not in owners[(protocol, port)]
    ]


def _declared(ruleset: RuleSet) -> set[int]:
    return {owner.port for owner in ruleset.cgroups.owners} if ruleset.cgroups is not None else set()


class GuardedBackend:
    name = "nftables+guard"
    cgroups = True

    def __init__(self, inner: NftablesBackend | None = None, cgroupfs: str = CGROUPFS) -> None:
        self.inner = inner or NftablesBackend()
        self.cgroupfs = cgroupfs
        self._guards: dict[str, _Entry] = {}  # pod cgroup directory -> the guard we attached there
        self._mutex = threading.Lock()  # the dicts only
        self._pods: dict[int, threading.Lock] = {}  # namespace inode -> one pod's operations

    def _directory(self, ruleset: RuleSet) -> str | None:
        if ruleset.cgroups is None or ruleset.cgroups.pod is None:
            return None
        return os.path.join(self.cgroupfs, ruleset.cgroups.pod.path)

    def _lock(self, ns: NetNS) -> threading.Lock:
        with self._mutex:
            for directory, entry in list(self._guards.items()):  # the kernel detached these with their cgroup
                if not os.path.isdir(directory):
                    entry.installed.close()
                    del self._guards[directory]
            return self._pods.setdefault(ns.inode, threading.Lock())

    def _entry(self, ns: NetNS) -> _Entry | None:
        with self._mutex:
            return next((e for e in self._guards.values() if e.inode == ns.inode), None)

    def unfit(self, ns: NetNS, ruleset: RuleSet) -> str | None:
        """Why this pod keeps its table (None: the guard can serve it)."""
        reason = sockaddr.unfit(ruleset) or nat_in(ns)
        directory = self._directory(ruleset)
        if reason is None and directory is not None and (others := bpf.foreign(directory)):
            reason = f"another program judges the pod's connects ({', '.join(others)})"
        if (
            reason is None
            and self._entry(ns) is None
            and directory is not None
            and not bpf.ours_on(directory)
        ):
            held = squatters(ns, ruleset, self.cgroupfs)  # moving from the table
            reason = f"a container that does not own it holds {', '.join(held)}" if held else None
        return reason

    def apply(self, ns: NetNS, ruleset: RuleSet) -> None:
        with self._lock(ns):
            reason = self.unfit(ns, ruleset)
            if reason is None:
                try:
                    self._guard(ns, ruleset)
                except EnforceError as err:  # fail closed: the pod keeps (or gets) its table
                    log.warning(
                        "socket guard failed, the table serves", extra={"pod": ruleset.pod, "error": str(err)}
                    )
                    reason = f"the guard failed: {err}"
                else:
                    if self.inner.installed(ns):  # the guard holds: our hooks leave the packet path
                        checked(
                            run_tool(ns, ["nft", "delete", "table", "inet", nft.TABLE]), "nft delete table"
                        )
                    return
            self.inner.apply(ns, ruleset)
            self._unguard(ns, ruleset)  # the table holds: the guard can go

    def _unguard(self, ns: NetNS, ruleset: RuleSet) -> None:
        entry = self._entry(ns)
        if entry is not None:
            with self._mutex:
                self._guards.pop(entry.installed.cgroup, None)
            entry.installed.detach()
        directory = self._directory(ruleset)
        if directory is not None and os.path.isdir(directory):
            bpf.detach_ids(directory, bpf.ours_on(directory))  # an earlier agent's, or a sandbox's before

    def _guard(self, ns: NetNS, ruleset: RuleSet) -> None:
        directory, guard = self._directory(ruleset), sockaddr.guard(ruleset)
        assert directory is not None
        reserve(ns, _declared(ruleset))  # before the guard: no moment a squatter is handed one
        local4, local6 = bpf.local_addresses(ns)
        with self._mutex:
            entry = self._guards.get(directory)
        if entry is not None and entry.guard.programs == guard.programs and entry.installed.whole():
            entry.installed.update(guard, local4, local6)
            entry.guard, entry.inode = guard, ns.inode
            return
        installed = bpf.install(directory, guard, local4, local6)
        try:
            installed.detach_others()  # ours is whole: an earlier one (a restarted agent's) goes
        except BaseException:
            installed.detach()
            raise
        with self._mutex:
            self._guards[directory] = _Entry(ns.inode, installed, guard)
        if entry is not None:
            entry.installed.close()  # detached by detach_others where it was still attached

    def update_cgroups(self, ns: NetNS, ruleset: RuleSet, installed: RuleSet) -> None:
        entry = self._entry(ns)
        guard = sockaddr.guard(ruleset) if ruleset.cgroups is not None else None
        if entry is not None and guard is not None and guard.programs == entry.guard.programs:
            with self._lock(ns):  # a restarted container: the maps' elements alone (~0.1 ms)
                entry.installed.update(guard, *bpf.local_addresses(ns))
                entry.guard = guard
            return
        if entry is not None or self.unfit(ns, ruleset) is None:
            self.apply(ns, ruleset)  # a move either way
        else:
            self.inner.update_cgroups(ns, ruleset, installed)

    def verify(self, ns: NetNS, ruleset: RuleSet) -> list[str]:
        return self.inspect(ns, ruleset).drift

    def inspect(self, ns: NetNS, ruleset: RuleSet) -> Inspection:
        with self._lock(ns):
            entry, reason, directory = self._entry(ns), self.unfit(ns, ruleset), self._directory(ruleset)
            if reason is None and directory is not None and entry is not None:  # else its table serves it
                entry.installed.update_local(*bpf.local_addresses(ns))  # the namespace's, not drift
                drift = entry.installed.drift(sockaddr.guard(ruleset), *bpf.local_addresses(ns))
                if sockaddr.guard(ruleset).programs != entry.guard.programs:
                    drift.append("the socket guard's programs are not the policy's")
                drift += [
                    f"declared port {p} is not reserved in the namespace"
                    for p in sorted(_declared(ruleset) - reserved(ns))
                ]
                return Inspection(drift, entry.installed.refused(entry.guard), entry.installed.observed())
            stale = bpf.ours_on(directory) if directory is not None and os.path.isdir(directory) else []
        inspection = self.inner.inspect(ns, ruleset)  # the table serves the pod (or should)
        if reason is not None and (entry is not None or stale):
            inspection.drift.append(f"a socket guard is attached, but the pod needs its table: {reason}")
        return inspection

    def installed(self, ns: NetNS) -> bool:
        return self._entry(ns) is not None or self.inner.installed(ns)

    def deny_counters(self, ns: NetNS) -> dict[str, int]:
        entry = self._entry(ns)
        return entry.installed.refused(entry.guard) if entry is not None else self.inner.deny_counters(ns)
