"""The rules: pod policy → one backend-neutral ruleset, which `rules.nft` and `rules.iptables` render
as the exact documents their backends load. Pure. This docstring is the one place that explains what
the rules decide; the dialects only spell it.

WHICH PACKETS. Every packet the pod's namespace sends that will be delivered inside it: routed to
`lo`, or addressed to 127.0.0.0/8 or ::1, or to one of the pod's own addresses as the routing table
says (`local`). The device is the one chosen before NAT (the output hook's device does not change
when a nat OUTPUT rule re-routes a packet), so a connection NAT sends to this host is caught by its
new destination: a mesh's REDIRECT to 127.0.0.1 / ::1 by the address, a DNAT to the pod's own
address by the routing table's word that it is local. Hence four matches that jump to the judging
chain. Ports are the ones a packet is finally delivered to, after that NAT. Traffic through other
interfaces is not judged.

THE DECISIONS, in the order both dialects evaluate them for every such packet:

1. TCP packets other than a connection-opening SYN pass — see CONNECTION STATE below. First,
   because every packet of an open connection takes this path.
2. ICMP errors pass: the kernel sends them (our own rejects included); unprivileged processes cannot.
3. Where the policy grants UDP, conntrack lets replies of accepted flows pass.
4. The sentinel port is answered with ICMP admin-prohibited, whoever asks: only our rules do that,
   which is how `netisolate gate` knows they are live.
5. UID 0 (the runtime: `kubectl port-forward`) passes unless the agent denies port-forward, and never
   in a user-namespaced pod, where UID 0 is the pod's own root.
6. A container's UID passes to the ports granted to it.
7. Everything else is counted (per container UID, so metrics can name the offender) and denied:
   TCP reset, ICMP port-unreachable for UDP, drop for other protocols. In audit mode the deny
   chain accepts instead, so the counters still show what enforcement would have stopped.

CONNECTION STATE: TCP is judged on its opening SYN alone and everything else of TCP is accepted.
That is sound because admission forbids NET_RAW/NET_ADMIN (no unprivileged process can emit a bare
ACK or RST) and it keeps conntrack out of namespaces that do not otherwise use it (conntrack costs
~14 % of the loopback connection rate). UDP has no opening packet, so pods that grant UDP get
conntrack to let replies back. This is the only place that choice is made.

PORT SETS are kept as nft lists them back (see `_merged`), so drift detection is a text comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby
from typing import Literal

from netisolate.policy import Level, PodPolicy, PortRange, Protocol

DEFAULT_SENTINEL_PORT = 9


@dataclass(frozen=True)
class Settings:
    """Agent settings that shape every pod's rules."""

    sentinel_port: int = DEFAULT_SENTINEL_PORT
    allow_root: bool = True  # False with --deny-port-forward


@dataclass(frozen=True)
class Grant:
    uid: int
    protocol: Protocol
    ports: tuple[PortRange, ...]
    containers: str  # comma-joined names of the containers running as this UID


@dataclass(frozen=True)
class Identity:
    uid: int
    containers: str


@dataclass(frozen=True)
class RuleSet:
    pod: str
    mode: Literal["enforce", "audit"]
    sentinel_port: int
    allow_root: bool
    grants: tuple[Grant, ...]
    identities: tuple[Identity, ...]

    @property
    def stateful(self) -> bool:
        """Conntrack is needed only for UDP replies (see CONNECTION_STATE)."""
        return any(grant.protocol == "udp" for grant in self.grants)


def _merged(ranges: list[PortRange]) -> tuple[PortRange, ...]:
    """Sorted ranges of one protocol as nft keeps them, so what we render is what it lists (drift
    is a text comparison): a run of overlapping or adjacent ports becomes one range, unless the
    run is only single ports, which stay single (`80, 81` stays; `80, 81-90` is `80-90`)."""
    runs: list[list[PortRange]] = []
    for r in ranges:
        if runs and r.low <= max(x.high for x in runs[-1]) + 1:
            runs[-1].append(r)
        else:
            runs.append([r])
    merged: list[PortRange] = []
    for run in runs:
        if all(r.low == r.high for r in run) and len({r.low for r in run}) == len(run):
            merged += run
        else:
            merged.append(PortRange(run[0].protocol, run[0].low, max(r.high for r in run)))
    return tuple(merged)


def build_ruleset(policy: PodPolicy, settings: Settings, user_namespaced: bool = False) -> RuleSet | None:
    """The ruleset for an isolated pod, or None when its level is off. `user_namespaced`: the kernel
    says the pod's network namespace belongs to a user namespace of its own, whatever the spec says."""
    if policy.level is Level.OFF:
        return None
    by_uid = sorted((c.uid, c.name, c.grants) for c in policy.containers if c.uid is not None)
    identities, grants = [], []
    for uid, group in groupby(by_uid, key=lambda item: item[0]):
        members = list(group)
        names = ",".join(sorted({name for _, name, _ in members}))
        identities.append(Identity(uid, names))
        ranges = sorted({r for _, _, container_grants in members for r in container_grants})
        for protocol in ("tcp", "udp"):
            ports = _merged([r for r in ranges if r.protocol == protocol])
            if ports:
                grants.append(Grant(uid, protocol, ports, names))
    mode: Literal["enforce", "audit"] = "enforce" if policy.level is Level.ENFORCE else "audit"
    # UID 0 is let through as the node's runtime (port-forward). In a user-namespaced pod, UID 0 is
    # the pod's own root and the runtime shows up as an unmapped UID: no exception there.
    allow_root = settings.allow_root and not (policy.user_namespaced or user_namespaced)
    return RuleSet(policy.pod, mode, settings.sentinel_port, allow_root, tuple(grants), tuple(identities))
