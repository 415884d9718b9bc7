"""Pod policy → backend-neutral ruleset → the exact text each backend loads. Pure.

The decisions (DESIGN.md, "Pod contract"), in the order both renderings evaluate them for every
packet that leaves through `lo`:

1. TCP packets other than a connection-opening SYN pass — see `CONNECTION_STATE` below. First,
   because every packet of an open connection takes this path.
2. ICMP errors pass: the kernel sends them (our own rejects included); unprivileged processes cannot.
3. Where the policy grants UDP, conntrack lets replies of accepted flows pass.
4. The sentinel port is answered with ICMP admin-prohibited, whoever asks: only our rules do that,
   which is how `netisolate gate` knows they are live.
5. UID 0 (the runtime: `kubectl port-forward`) passes unless the agent denies port-forward.
6. A container's UID passes to the ports granted to it.
7. Everything else is counted (per container UID, so metrics can name the offender) and denied:
   TCP reset, ICMP port-unreachable for UDP, drop for other protocols. In audit mode the deny
   chain accepts instead, so the counters still show what enforcement would have stopped.

CONNECTION_STATE: TCP is judged on its opening SYN alone and everything else of TCP is accepted.
That is sound because admission forbids NET_RAW/NET_ADMIN (no unprivileged process can emit a bare
ACK or RST) and it keeps conntrack out of namespaces that do not otherwise use it (conntrack costs
~14 % of the loopback connection rate). UDP has no opening packet, so pods that grant UDP get
conntrack to let replies back. This is the only place that choice is made.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby
from typing import Literal

from netisolate.policy import Level, PodPolicy, PortRange, Protocol

NFT_TABLE = "netisolate"
IPT_CHAIN = "NETISOLATE"
IPT_DENY_CHAIN = "NETISOLATE-DENY"
DEFAULT_SENTINEL_PORT = 9
# multiport takes at most 15 ports (a range counts twice)
_MULTIPORT_SLOTS = 15

Family = Literal[4, 6]


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


# --- nftables ---------------------------------------------------------------------------------
# The table is written exactly as `nft list table inet netisolate` prints it (less counter values),
# so drift detection is a text comparison.


# Which packets are loopback traffic. `oif` is the device the packet was routed to before NAT (the
# hook's device does not change when a nat OUTPUT rule re-routes it), so a connection NAT sends to
# this host is caught by its new destination instead: a mesh's REDIRECT to 127.0.0.1 / ::1 by the
# address, a DNAT to one of the pod's own addresses by the routing table's word that it is local.
_NFT_LOOPBACK_MATCHES = ('oif "lo"', "ip daddr 127.0.0.0/8", "ip6 daddr ::1", "fib daddr type local")


def _nft_ports(ports: tuple[PortRange, ...]) -> str:
    items = [str(p.low) if p.low == p.high else f"{p.low}-{p.high}" for p in ports]
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


def nft_table(rs: RuleSet) -> str:
    """The table block, in nft's own listing format; counters print as a bare `counter`."""
    loopback = [
        "tcp flags != syn / syn,ack accept",  # first: the path of every packet of an open connection
        "icmp type { destination-unreachable, time-exceeded, parameter-problem } accept",
        "icmpv6 type { destination-unreachable, packet-too-big, time-exceeded, parameter-problem } accept",
    ]
    if rs.stateful:
        loopback.append("ct state established,related accept")
    loopback.append(
        f"meta l4proto {{ tcp, udp }} th dport {rs.sentinel_port} reject with icmpx admin-prohibited"
    )
    if rs.allow_root:
        loopback.append("meta skuid 0 accept")
    loopback += [
        f'meta skuid {g.uid} {g.protocol} dport {_nft_ports(g.ports)} accept comment "{g.containers}"'
        for g in rs.grants
    ]
    loopback += [f'meta skuid {i.uid} counter goto deny comment "{i.containers}"' for i in rs.identities]
    loopback.append("counter goto deny")
    deny = (
        ["accept"]
        if rs.mode == "audit"
        else ["meta l4proto tcp reject with tcp reset", "meta l4proto udp reject", "drop"]
    )
    chains = {
        "output": [
            "type filter hook output priority filter; policy accept;",
            *(f"{match} jump loopback" for match in _NFT_LOOPBACK_MATCHES),
        ],
        "loopback": loopback,
        "deny": deny,
    }
    body = "\n\n".join(
        f"\tchain {name} {{\n" + "".join(f"\t\t{line}\n" for line in lines) + "\t}"
        for name, lines in chains.items()
    )
    return f"table inet {NFT_TABLE} {{\n{body}\n}}\n"


def render_nftables(rs: RuleSet) -> str:
    """One `nft -f` transaction: declare (so a first apply works), delete, re-create.

    The kernel applies the whole document or none of it, so there is no moment with half a
    table, and loading it twice leaves the same table: atomic and idempotent.
    """
    return f"table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n{nft_table(rs)}"


# --- iptables ---------------------------------------------------------------------------------
# Written as `iptables-save` prints rules, for `iptables-restore --noflush`: declaring our chains
# flushes only them; the jump from OUTPUT is the backend's to keep unique and first.


@dataclass(frozen=True)
class _Icmp:
    proto: str
    module: str
    option: str
    error_types: tuple[int, ...]
    unreachable: str
    prohibited: str


_ICMP: dict[Family, _Icmp] = {
    4: _Icmp("icmp", "icmp", "--icmp-type", (3, 11, 12), "icmp-port-unreachable", "icmp-admin-prohibited"),
    6: _Icmp(
        "ipv6-icmp", "icmp6", "--icmpv6-type", (1, 2, 3, 4), "icmp6-port-unreachable", "icmp6-adm-prohibited"
    ),
}


def _multiport_chunks(ports: tuple[PortRange, ...]) -> list[str]:
    chunks: list[list[str]] = [[]]
    used = 0
    for p in ports:
        item, cost = (str(p.low), 1) if p.low == p.high else (f"{p.low}:{p.high}", 2)
        if used + cost > _MULTIPORT_SLOTS:
            chunks.append([])
            used = 0
        chunks[-1].append(item)
        used += cost
    return [",".join(chunk) for chunk in chunks]


def _comment(containers: str) -> str:
    return f"-m comment --comment {containers}"


def iptables_rules(rs: RuleSet, family: Family) -> list[str]:
    """Rule specs (without `-A CHAIN`) for our main chain, in order."""
    icmp = _ICMP[family]
    rules = ["-p tcp -m tcp ! --tcp-flags SYN,ACK SYN -j ACCEPT"]
    rules += [f"-p {icmp.proto} -m {icmp.module} {icmp.option} {t} -j ACCEPT" for t in icmp.error_types]
    if rs.stateful:
        rules.append("-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")
    rules += [
        f"-p {proto} -m {proto} --dport {rs.sentinel_port} -j REJECT --reject-with {icmp.prohibited}"
        for proto in ("tcp", "udp")
    ]
    if rs.allow_root:
        rules.append("-m owner --uid-owner 0 -j ACCEPT")
    rules += [
        f"-p {g.protocol} -m owner --uid-owner {g.uid} -m multiport --dports {chunk} "
        f"{_comment(g.containers)} -j ACCEPT"
        for g in rs.grants
        for chunk in _multiport_chunks(g.ports)
    ]
    rules += [
        f"-m owner --uid-owner {i.uid} {_comment(i.containers)} -g {IPT_DENY_CHAIN}" for i in rs.identities
    ]
    rules.append(f"-g {IPT_DENY_CHAIN}")
    return rules


def iptables_deny_rules(rs: RuleSet, family: Family) -> list[str]:
    if rs.mode == "audit":
        return ["-j ACCEPT"]
    return [
        "-p tcp -j REJECT --reject-with tcp-reset",
        f"-p udp -j REJECT --reject-with {_ICMP[family].unreachable}",
        "-j DROP",
    ]


_IPT_LOOPBACK_MATCHES: dict[Family, tuple[str, ...]] = {
    4: ("-o lo", "-d 127.0.0.0/8", "-m addrtype --dst-type LOCAL"),
    6: ("-o lo", "-d ::1/128", "-m addrtype --dst-type LOCAL"),
}


def iptables_jumps(family: Family) -> list[str]:
    """The jumps from OUTPUT to our chain, which must be OUTPUT's first rules, in this order
    (see _NFT_LOOPBACK_MATCHES for why there are several)."""
    return [f"{match} -j {IPT_CHAIN}" for match in _IPT_LOOPBACK_MATCHES[family]]


def render_iptables(rs: RuleSet, family: Family) -> str:
    """An `iptables-restore --noflush` (or ip6tables-restore) document for the filter table."""
    lines = ["*filter", f":{IPT_CHAIN} - [0:0]", f":{IPT_DENY_CHAIN} - [0:0]"]
    lines += [f"-A {IPT_CHAIN} {rule}" for rule in iptables_rules(rs, family)]
    lines += [f"-A {IPT_DENY_CHAIN} {rule}" for rule in iptables_deny_rules(rs, family)]
    lines += [f"-I OUTPUT {i} {jump}" for i, jump in enumerate(iptables_jumps(family), 1)]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"
