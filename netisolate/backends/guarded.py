"""nftables with the socket guard: the agent's backend under `--socket-guard`.

A pod the guard can serve as netfilter would (netisolate.rules.sockaddr.unfit: its pod's cgroup
known, whatever the identity, no UDP grant, enforce, port-forward allowed), whose namespace holds no NAT
(a nat table or chain would send a connection somewhere else than the address the guard judged)
and whose cgroup no other program judges connects on (a socket load-balancer's rewrite would do
the same) is judged by the guard alone: its declared ports are reserved in the namespace (the
kernel never picks one for an unbound socket), its programs are attached to the pod's cgroup,
then the pod's nftables table is deleted, so no packet of the pod meets a netfilter hook of ours.
Every other pod keeps its table. A pod moves between the two without a moment unguarded: the new
one is in place before the old one goes, and a guard that fails to go in leaves the pod on its
table. The CNI ADD's table (the pod's cgroup is not known before its sandbox runs) is replaced by
the guard once the sandbox's cgroup is seen. A pod moves to the guard only while its namespace
holds no bound or connected socket (or where a guard already judged its every socket: ours,
attached for this namespace, or a restarted agent's), asked once the guard is attached, so a
socket bound or connected after the question meets the guard: the guard judges a socket when it
binds or connects, the table every packet, so a socket bound or connected under the table (a
squatter on an owner's port, a UDP socket connected to a port nobody granted) would keep what the
table denied it. Before Linux 6.8, which lists sockets that are only bound, the pod's cgroup must
show no container made either.

Verification reads the kernel: our program at every attach point of the pod's cgroup and no other
of ours, every map exactly as the policy wants, NAT, other programs and reserved ports as they
are now. The local routes are refreshed on every round (an address that appeared is the
namespace changing, not drift). What cannot be read or written here is an EnforceError, and a
guard that cannot go in leaves the pod on its table.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from netisolate.backends import bpf, libnft, sockdiag, sysctl
from netisolate.backends.base import EnforceError, Inspection, checked, run_tool
from netisolate.backends.nftables import NftablesBackend
from netisolate.netns import NetNS
from netisolate.rules import RuleSet, nft, sockaddr

CGROUPFS = "/sys/fs/cgroup"  # where rules' cgroup paths are relative to, as for nft
_RESERVED = "/proc/sys/net/ipv4/ip_local_reserved_ports"  # per namespace, IPv6 included
SWEEP_S = 10.0  # how often the pods whose cgroup is gone are forgotten (a stat each)
log = logging.getLogger(__name__)


@dataclass
class _Entry:
    cookie: int  # the namespace it was attached for (netisolate.netns.NetNS.cookie)
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


# Before Linux 6.8 sock_diag does not list a TCP socket that is bound and no more (a squatter
# that listens only once the table is gone): there, a pod moves only while no container has been
# made, as far as its cgroup tells (no cgroup under the pod's but its sandbox's holds a process).
BOUND_LISTED = tuple(int(n) for n in re.findall(r"\d+", os.uname().release)[:2]) >= (6, 8)


def _opened(ns: NetNS, directory: str) -> list[str]:
    """What the namespace holds that the guard never judged ([]: nothing)."""
    opened = ns.run(sockdiag.opened)
    if opened or BOUND_LISTED:
        return opened
    populated = []
    for child in os.scandir(directory):
        try:  # (a cgroup being removed holds no process)
            if (
                child.is_dir(follow_symlinks=False)
                and "populated 1" in Path(child.path, "cgroup.events").read_text()
            ):
                populated.append(child.name)
        except OSError:
            continue
    made = len(populated) - 1
    return (
        [f"{made} containers made before it, whose bound sockets Linux < 6.8 cannot list"] if made > 0 else []
    )


def _declared(ruleset: RuleSet) -> set[int]:
    owners = ruleset.cgroups.owners if ruleset.cgroups is not None else ruleset.owners
    return {owner.port for owner in owners}


class GuardedBackend:
    name = "nftables+guard"
    cgroups = True
    wants_pod_cgroup = True  # attached there, whatever the identity

    def __init__(self, inner: NftablesBackend | None = None, cgroupfs: str = CGROUPFS) -> None:
        self.inner = inner or NftablesBackend()
        self.cgroupfs = cgroupfs
        self._guards: dict[str, _Entry] = {}  # pod cgroup directory -> the guard we attached there
        # pod cgroup directory -> (namespace cookie, why): moves refused for good (sockets were open)
        self._tabled: dict[str, tuple[int, str]] = {}
        self._mutex = threading.Lock()  # the dicts only
        # namespace cookie -> (one pod's operations, its cgroup directory once known)
        self._pods: dict[int, tuple[threading.Lock, str]] = {}
        self._swept = time.monotonic()
        self.unloadable = ""  # why this kernel refuses the guard's programs: every pod keeps its table

    def _directory(self, ruleset: RuleSet) -> str | None:
        pod = ruleset.own_cgroup
        return os.path.join(self.cgroupfs, pod.path) if pod is not None else None

    def _lock(self, ns: NetNS, ruleset: RuleSet) -> threading.Lock:
        """The pod's own lock (its operations one at a time), after forgetting, now and then, the
        pods whose cgroup is gone."""
        cookie, directory = ns.cookie, self._directory(ruleset) or ""
        with self._mutex:
            if time.monotonic() - self._swept > SWEEP_S:
                self._sweep()
            lock, known = self._pods.get(cookie, (threading.Lock(), ""))
            self._pods[cookie] = (lock, directory or known)
            return lock

    def _sweep(self) -> None:
        """(Under the mutex.) The kernel detached a gone cgroup's programs with it: our fds go, and
        what we noted of its pod. A pod at work closes nothing of its own under itself."""
        self._swept = time.monotonic()
        for cookie, (lock, directory) in list(self._pods.items()):
            if not directory or os.path.isdir(directory) or not lock.acquire(blocking=False):
                continue
            try:
                entry = self._guards.pop(directory, None)
                if entry is not None:
                    entry.installed.close()
                self._tabled.pop(directory, None)
                del self._pods[cookie]
            finally:
                lock.release()

    def _entry(self, ns: NetNS) -> _Entry | None:
        with self._mutex:
            return next((e for e in self._guards.values() if e.cookie == ns.cookie), None)

    def unfit(self, ns: NetNS, ruleset: RuleSet) -> str | None:
        """Why this pod keeps its table (None: the guard can serve it)."""
        reason = self.unloadable or sockaddr.unfit(ruleset) or nat_in(ns)
        directory = self._directory(ruleset)
        if reason is None and directory is not None and (others := bpf.foreign(directory)):
            reason = f"another program judges the pod's connects ({', '.join(others)})"
        tabled = self._tabled.get(directory or "")
        if reason is None and tabled is not None and tabled[0] == ns.cookie:
            reason = tabled[1]
        return reason

    def _fit(self, ns: NetNS, ruleset: RuleSet) -> str | None:
        """unfit(), where not being able to tell is a reason too."""
        try:
            return self.unfit(ns, ruleset)
        except (EnforceError, OSError) as err:
            return f"cannot tell whether the guard can serve it: {err}"

    def apply(self, ns: NetNS, ruleset: RuleSet) -> None:
        with self._lock(ns, ruleset):
            reason = self._fit(ns, ruleset)
            if reason is None:
                try:
                    reason = self._guard(ns, ruleset)
                except bpf.LoadError as err:  # said once, and not tried again for every pod
                    self.unloadable = f"the kernel refuses the socket guard's programs: {err}"
                    log.warning(
                        "socket guard unavailable on this node, every pod keeps its table",
                        extra={"pod": ruleset.pod, "error": str(err)},
                    )
                    reason = self.unloadable
                except (EnforceError, OSError) as err:  # fail closed: the pod keeps (or gets) its table
                    log.warning(
                        "socket guard failed, the table serves", extra={"pod": ruleset.pod, "error": str(err)}
                    )
                    reason = f"the guard failed: {err}"
                if reason is None:
                    if self.inner.installed(ns):  # the guard holds: our hooks leave the packet path
                        checked(
                            run_tool(ns, ["nft", "delete", "table", "inet", nft.TABLE]), "nft delete table"
                        )
                    return
            self.inner.apply(ns, ruleset)
            self._unguard(ns, ruleset)  # the table holds: the guard can go (a move refused, too)

    def _unguard(self, ns: NetNS, ruleset: RuleSet) -> None:
        entry = self._entry(ns)
        if entry is not None:
            with self._mutex:
                self._guards.pop(entry.installed.cgroup, None)
            entry.installed.detach()
        directory = self._directory(ruleset)
        if directory is not None and os.path.isdir(directory):
            bpf.detach_ids(directory, bpf.ours_on(directory))  # an earlier agent's, or a sandbox's before

    def _guard(self, ns: NetNS, ruleset: RuleSet) -> str | None:
        """Attach (or update) the pod's guard; why the table must stay after all (None: it need
        not): a move that finds sockets already bound or connected, which the guard never judged."""
        directory, guard = self._directory(ruleset), sockaddr.guard(ruleset)
        assert directory is not None
        reserve(ns, _declared(ruleset))  # before the guard: no moment a squatter is handed one
        local4, local6 = bpf.local_addresses(ns)
        with self._mutex:
            entry = self._guards.get(directory)
        # A guard judged this namespace's every socket: ours, attached for it (a recreated sandbox's
        # new namespace was judged with the old one's local addresses), or a restarted agent's, whole.
        if entry is not None:
            judged = entry.cookie == ns.cookie
        else:
            judged = {point for point, _ in bpf.ours_on(directory)} == {point for point, _ in sockaddr.ATTACH}
        if entry is not None and entry.guard.programs == guard.programs and entry.installed.whole():
            entry.installed.update(guard, local4, local6)
            entry.guard, entry.cookie = guard, ns.cookie
        else:
            installed = bpf.install(directory, guard, local4, local6)
            with self._mutex:
                self._guards[directory] = _Entry(ns.cookie, installed, guard)
            if entry is not None:
                entry.installed.close()  # (its programs go with the others' below)
            try:
                installed.detach_others()  # ours is whole: an earlier one (a restarted agent's) goes
            except (EnforceError, OSError) as err:  # ours holds; what is left over is drift, retried
                log.warning(
                    "an earlier socket guard stays attached", extra={"pod": ruleset.pod, "error": str(err)}
                )
        opened = [] if judged else _opened(ns, directory)  # asked now: any later one meets the guard
        if opened:
            shown = ", ".join(opened[:3]) + (f" and {len(opened) - 3} more" if len(opened) > 3 else "")
            reason = f"the namespace holds what the guard never judged ({shown})"
            with self._mutex:
                self._tabled[directory] = (ns.cookie, reason)
            log.info("the pod keeps its table", extra={"pod": ruleset.pod, "reason": reason})
            return reason
        return None

    def update_cgroups(self, ns: NetNS, ruleset: RuleSet, installed: RuleSet) -> None:
        guard = sockaddr.guard(ruleset)
        with self._lock(ns, ruleset):
            entry = self._entry(ns)
            if entry is not None and guard.programs == entry.guard.programs:
                try:  # a restarted container: the maps' elements alone (~0.1 ms)
                    entry.installed.update(guard, *bpf.local_addresses(ns))
                except OSError as err:
                    raise EnforceError(f"updating the socket guard of {ruleset.pod}: {err}") from None
                entry.guard = guard
                return
        if entry is not None or self._fit(ns, ruleset) is None:
            self.apply(ns, ruleset)  # a move either way
        else:
            self.inner.update_cgroups(ns, ruleset, installed)

    def verify(self, ns: NetNS, ruleset: RuleSet) -> list[str]:
        return self.inspect(ns, ruleset).drift

    def inspect(self, ns: NetNS, ruleset: RuleSet) -> Inspection:
        try:
            return self._inspect(ns, ruleset)
        except OSError as err:
            raise EnforceError(f"reading the socket guard of {ruleset.pod}: {err}") from None

    def _inspect(self, ns: NetNS, ruleset: RuleSet) -> Inspection:
        with self._lock(ns, ruleset):
            entry, reason, directory = self._entry(ns), self._fit(ns, ruleset), self._directory(ruleset)
            if reason is None and directory is not None and entry is not None:  # else its table serves it
                local = bpf.local_addresses(ns)
                entry.installed.update_local(*local)  # the namespace changing is not drift
                wanted = sockaddr.guard(ruleset)
                drift = entry.installed.drift(wanted, *local)
                if wanted.programs != entry.guard.programs:
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
