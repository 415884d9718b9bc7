"""The ruleset in iptables: two chains of our own per family (IPv4 for `iptables`, IPv6 for
`ip6tables`), written as `iptables-save` prints them, and the jumps to them that must be the first
rules of OUTPUT. What the rules decide, and why, is explained once, in `netisolate.rules`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from netisolate.policy import PortRange
from netisolate.rules import Owner, RuleSet

CHAIN = "NETISOLATE"
SERVE_CHAIN = "NETISOLATE-SERVE"
REFUSE_CHAIN = "NETISOLATE-REFUSE"
DENY_CHAIN = "NETISOLATE-DENY"
Family = Literal[4, 6]
_MULTIPORT_SLOTS = 15  # multiport takes at most 15 ports (a range counts twice)


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
# the packets that stay in the pod, or of which the kernel keeps a copy for it (see WHICH PACKETS)
_JUDGED: dict[Family, tuple[str, ...]] = {
    4: (
        "-o lo",
        "-d 127.0.0.0/8",
        "-m addrtype --dst-type LOCAL",
        *(f"-p {p} -m addrtype --dst-type BROADCAST,MULTICAST" for p in ("udp", "udplite")),
    ),
    6: (
        "-o lo",
        "-d ::1/128",
        "-m addrtype --dst-type LOCAL",
        *(f"-d ff00::/8 -p {p}" for p in ("udp", "udplite")),
    ),
}
_SYN_ACK = "--tcp-flags SYN,ACK SYN,ACK"


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


def _owners(owner: Owner, negated: bool) -> list[str]:
    """One owner match per UID: negated, all must hold (none of them); else one rule each."""
    return [f"-m owner {'! ' if negated else ''}--uid-owner {uid}" for uid in owner.uids]


def _judging(rs: RuleSet, family: Family) -> list[str]:
    icmp = _ICMP[family]
    rules = ["-p tcp -m tcp ! --tcp-flags SYN SYN -j ACCEPT", f"-p tcp -m tcp {_SYN_ACK} -g {SERVE_CHAIN}"]
    rules += [f"-p {icmp.proto} -m {icmp.module} {icmp.option} {t} -j ACCEPT" for t in icmp.error_types]
    rules += [
        f"-p udp -m udp --sport {owner.port} {' '.join(_owners(owner, True))} {_comment(owner.containers)} "
        f"-g {REFUSE_CHAIN}"
        for owner in rs.owned("udp")
    ]
    if rs.stateful:
        rules.append("-m conntrack --ctdir REPLY -j ACCEPT")
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
    rules.append(f"-g {REFUSE_CHAIN}")
    return rules


def _serve(rs: RuleSet) -> list[str]:
    """SYN-ACKs, in a chain of their own so that a SYN never walks the declared ports."""
    rules = []
    for owner in rs.owned("tcp"):
        served = f"-p tcp -m tcp --sport {owner.port}"
        rules += [
            f"{served} {match} {_comment(owner.containers)} -j ACCEPT" for match in _owners(owner, False)
        ]
        rules.append(f"{served} -g {REFUSE_CHAIN}")
    return [*rules, "-j ACCEPT"]


def _refuse(rs: RuleSet) -> list[str]:
    rules = [f"-m owner --uid-owner {i.uid} {_comment(i.containers)} -g {DENY_CHAIN}" for i in rs.identities]
    return [*rules, f"-g {DENY_CHAIN}"]


def _deny(rs: RuleSet, family: Family) -> list[str]:
    if rs.mode == "audit":
        return ["-j ACCEPT"]
    return [
        "-p tcp -j REJECT --reject-with tcp-reset",
        f"-p udp -j REJECT --reject-with {_ICMP[family].unreachable}",
        "-j DROP",
    ]


def chains(rs: RuleSet, family: Family) -> dict[str, list[str]]:
    """Our chains' rules as `iptables-save` lists them, less the `-A CHAIN ` prefix."""
    return {
        CHAIN: _judging(rs, family),
        SERVE_CHAIN: _serve(rs),
        REFUSE_CHAIN: _refuse(rs),
        DENY_CHAIN: _deny(rs, family),
    }


def jumps(family: Family) -> list[str]:
    """The rules that must begin OUTPUT, in this order, and be its only jumps to our chain."""
    return [f"{match} -j {CHAIN}" for match in _JUDGED[family]]


def jumps_in_place(output: Sequence[str], family: Family) -> bool:
    """Whether OUTPUT's rules (as `iptables-save` lists them, less `-A OUTPUT `) begin with our jumps
    and jump to our chain nowhere else."""
    expected = jumps(family)
    ours = [rule for rule in output if rule.endswith(f"-j {CHAIN}")]
    return list(output[: len(expected)]) == expected and ours == expected


def document(rs: RuleSet, family: Family, output: Sequence[str] = ()) -> str:
    """The `iptables-restore --noflush` (or ip6tables-restore) document for the filter table, given
    OUTPUT's current rules (empty for a new namespace). Declaring our chains flushes only them, and
    the whole table is committed at once; when our jumps are not already exactly first, the same
    commit deletes every jump to our chain and inserts them first, so they end up once and first."""
    lines = ["*filter", *(f":{chain} - [0:0]" for chain in chains(rs, family))]
    lines += [f"-A {chain} {rule}" for chain, rules in chains(rs, family).items() for rule in rules]
    if not jumps_in_place(output, family):
        lines += [f"-D OUTPUT {rule}" for rule in output if rule.endswith(f"-j {CHAIN}")]
        lines += [f"-I OUTPUT {i} {jump}" for i, jump in enumerate(jumps(family), 1)]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"
