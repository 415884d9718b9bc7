"""What the pod's sockets are bound to, for two checks the rules cannot make themselves.

`exposed`: ports that accept connections from beyond loopback, reachable by hairpin through a
Service or NodePort (leaving by eth0 and coming back in), where loopback rules do not apply. Not
only wildcard binds count: an address of the pod's own (its IP, or the IPv4-mapped form of it) is as
reachable. Reported are the ports the pod means to keep on loopback: those granted to a container
(TCP or UDP), and TCP listeners that no container declares as a containerPort (a port meant to be
served is declared; an admin port bound to 0.0.0.0 by mistake usually is not).

`squatted`: declared ports bound by a UID that does not own them. The rules refuse the squatter's
SYN-ACKs and datagrams from the port, but what is sent to it still arrives (the input path has no
owner match), so the agent reports it.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from netisolate.backends import sockdiag
from netisolate.model import Pod
from netisolate.netns import NetNS
from netisolate.rules import Owner, RuleSet


@dataclass(frozen=True, order=True)
class Socket:
    protocol: str  # tcp | udp
    port: int


@dataclass(frozen=True)
class Bound:
    """A TCP listener or a UDP socket; `uid` as the node sees it (the agent's user namespace)."""

    protocol: str
    address: str
    port: int
    uid: int
    connected: bool = False


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def beyond_loopback(bound: Iterable[Bound]) -> set[Socket]:
    """Of the sockets that take traffic from anyone (listeners, unconnected UDP), those not bound
    to 127/8 or ::1 (in either form)."""
    return {Socket(b.protocol, b.port) for b in bound if not b.connected and not _loopback(b.address)}


def _bound() -> list[Bound]:
    """TCP listeners and UDP sockets of this thread's network namespace."""
    found = []
    for family in sockdiag.FAMILIES:
        tcp = sockdiag.dump(family, socket.IPPROTO_TCP, 1 << sockdiag.TCP_LISTEN)
        found += [Bound("tcp", e.address, e.port, e.uid) for e in tcp]
        udp = sockdiag.dump(family, socket.IPPROTO_UDP, sockdiag.ALL_STATES)
        found += [Bound("udp", e.address, e.port, e.uid, e.connected) for e in udp]
    return found


def exposed(ns: NetNS, pod: Pod, ruleset: RuleSet) -> list[str]:
    """What of the pod listens beyond loopback though it looks meant for loopback only."""

    sockets = beyond_loopback(ns.run(_bound))  # the diag socket is opened inside the pod's namespace
    granted: dict[Socket, str] = {}
    for grant in ruleset.grants:
        for r in grant.ports:
            for port in range(r.low, r.high + 1):
                key = Socket(grant.protocol, port)
                granted[key] = ", ".join(filter(None, (granted.get(key), grant.containers)))
    declared = {p.container_port for c in pod.all_containers() for p in c.ports}
    found = [
        f"{s.port}{'/udp' if s.protocol == 'udp' else ''} (granted to {granted[s]})"
        for s in sockets
        if s in granted
    ]
    found += [
        f"{s.port} (no container declares it)"
        for s in sockets
        if s not in granted and s.protocol == "tcp" and s.port not in declared
    ]
    return sorted(found)


def squatted(ns: NetNS, ruleset: RuleSet) -> list[str]:
    """Declared ports bound by a UID that owns none of them, naming the squatter. Not for pods
    whose network namespace has a user namespace of its own: the kernel reports node UIDs, the
    rules name the pod's, and the map between them is not ours to read here."""
    if not ruleset.owners:
        return []
    owner = ns.foreign_owner()
    if owner is not None:
        os.close(owner)
        return []
    owners: dict[tuple[str, int], Owner] = {(o.protocol, o.port): o for o in ruleset.owners}
    names = {i.uid: i.containers for i in ruleset.identities}
    found = set()
    for b in ns.run(_bound):
        declared = owners.get((b.protocol, b.port))
        if declared is not None and b.uid not in declared.uids:
            who = f"{names[b.uid]} (UID {b.uid})" if b.uid in names else f"UID {b.uid}, no container's"
            port = f"{b.port}{'/udp' if b.protocol == 'udp' else ''}"
            found.add(f"{port} declared by {declared.containers}, bound by {who}")
    return sorted(found)
