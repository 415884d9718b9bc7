"""Ports that accept connections from beyond loopback: reachable by hairpin through a Service or
NodePort (leaving by eth0 and coming back in), where loopback rules do not apply.

Not only wildcard binds count: an address of the pod's own (its IP, or the IPv4-mapped form of it)
is as reachable. Reported are the ports the pod means to keep on loopback: those granted to a
container (TCP or UDP), and TCP listeners that no container declares as a containerPort (a port
meant to be served is declared; an admin port bound to 0.0.0.0 by mistake usually is not).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from netisolate.model import Pod
from netisolate.netns import NetNS
from netisolate.rules import RuleSet

_TCP_LISTEN = "0A"
_IPV6_LOOPBACK = "00000000000000000000000001000000"  # ::1 as /proc prints it (32-bit words, host order)
_IPV4_MAPPED = "0000000000000000FFFF0000"


@dataclass(frozen=True, order=True)
class Socket:
    protocol: str  # tcp | udp
    port: int


def _loopback(address: str) -> bool:
    """An address from /proc/net/{tcp,udp}{,6} in 127.0.0.0/8 or ::1 (also IPv4-mapped)."""
    if len(address) == 8:
        return address[6:8] == "7F"  # the first octet is the last byte printed (little-endian)
    return address == _IPV6_LOOPBACK or (address.startswith(_IPV4_MAPPED) and address[30:32] == "7F")


def beyond_loopback(table: str, protocol: str) -> set[Socket]:
    """Sockets of one /proc/net table that take traffic from beyond loopback: TCP listeners, and
    unconnected UDP sockets, bound to anything but 127/8 or ::1."""
    found = set()
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4:
            continue
        address, _, port = fields[1].partition(":")
        remote = fields[2].partition(":")[0]
        open_ = fields[3] == _TCP_LISTEN if protocol == "tcp" else not remote.strip("0")
        if open_ and not _loopback(address):
            found.add(Socket(protocol, int(port, 16)))
    return found


def exposed(ns: NetNS, pod: Pod, ruleset: RuleSet) -> list[str]:
    """What of the pod listens beyond loopback though it looks meant for loopback only."""

    def read() -> set[Socket]:
        # thread-self: this thread's namespace, which NetNS.run has made the pod's
        net = Path("/proc/thread-self/net")
        return {
            socket
            for protocol in ("tcp", "udp")
            for table in (protocol, f"{protocol}6")
            for socket in beyond_loopback((net / table).read_text(), protocol)
        }

    sockets = ns.run(read)
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
