"""Granted ports that listen on a wildcard address: reachable by hairpin through a Service or
NodePort (leaving by eth0 and coming back in), where loopback rules do not apply."""

from __future__ import annotations

from pathlib import Path

from netisolate.netns import NetNS
from netisolate.rules import RuleSet

_LISTEN = "0A"
_WILDCARDS = {"00000000", "00000000000000000000000000000000"}


def wildcard_ports(table: str) -> set[int]:
    """TCP ports in LISTEN state bound to 0.0.0.0 or ::, from a /proc/net/tcp{,6} text."""
    ports = set()
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[3] == _LISTEN:
            address, _, port = fields[1].partition(":")
            if address in _WILDCARDS:
                ports.add(int(port, 16))
    return ports


def exposed_grants(ns: NetNS, ruleset: RuleSet) -> list[str]:
    """'container:port' for each granted TCP port some process of the pod listens on a wildcard."""

    def read() -> str:
        # thread-self: this thread's namespace, which NetNS.run has made the pod's
        return "".join(Path(f"/proc/thread-self/net/{t}").read_text() for t in ("tcp", "tcp6"))

    listening = wildcard_ports(ns.run(read))
    return sorted(
        f"{grant.containers}:{port}"
        for grant in ruleset.grants
        if grant.protocol == "tcp"
        for r in grant.ports
        for port in range(r.low, r.high + 1)
        if port in listening
    )
