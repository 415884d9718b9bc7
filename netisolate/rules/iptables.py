"""The ruleset in iptables: two chains of our own per family (IPv4 for `iptables`, IPv6 for
`ip6tables`) and the jumps to them that must be the first rules of OUTPUT. What the rules decide,
and why, is explained once, in `netisolate.rules`.

Rules are data: each match and target carries the words `iptables-save` prints for it and the
struct the kernel holds for it, side by side, so the `-restore` document, the drift check and the
in-process table (`rules.xtables`) are three readings of one rule."""

from __future__ import annotations

import re
import struct
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
PROTOCOLS = {"icmp": 1, "tcp": 6, "udp": 17, "ipv6-icmp": 58, "udplite": 136}
_TCP_FLAGS = {"SYN": 0x02, "ACK": 0x10}


@dataclass(frozen=True)
class Match:
    """A `-m` module: its options as `iptables-save` prints them, and its struct (x_tables ABI)."""

    module: str
    options: str
    revision: int
    data: bytes

    def __str__(self) -> str:
        return f"-m {self.module} {self.options}"


@dataclass(frozen=True)
class Target:
    """`-j` or `-g`: a verdict (ACCEPT, DROP), one of our chains, or an extension (`data` is its
    struct; None for the first two)."""

    name: str
    options: str = ""
    goto: bool = False
    revision: int = 0
    data: bytes | None = None

    def __str__(self) -> str:
        return " ".join(filter(None, ("-g" if self.goto else "-j", self.name, self.options)))


@dataclass(frozen=True)
class Rule:
    """One rule: what the entry itself matches (destination, output device, protocol), its
    matches, its target; printed in `iptables-save`'s order."""

    target: Target
    matches: tuple[Match, ...] = ()
    protocol: str | None = None
    destination: str | None = None  # an address with its prefix length
    out_interface: str | None = None

    def __str__(self) -> str:
        words = [
            *(["-d", self.destination] if self.destination else []),
            *(["-o", self.out_interface] if self.out_interface else []),
            *(["-p", self.protocol] if self.protocol else []),
            *map(str, self.matches),
            str(self.target),
        ]
        return " ".join(words)


ACCEPT, DROP = Target("ACCEPT"), Target("DROP")


def goto(chain: str) -> Target:
    return Target(chain, goto=True)


def jump(chain: str) -> Target:
    return Target(chain)


def _range(port: int | None) -> tuple[int, int]:
    """A port match's (low, high): the port, or any."""
    return (port, port) if port is not None else (0, 0xFFFF)


def _port_words(sport: int | None, dport: int | None) -> list[str]:
    return [f"--{name} {port}" for name, port in (("sport", sport), ("dport", dport)) if port is not None]


def tcp(
    sport: int | None = None,
    dport: int | None = None,
    flags: tuple[str, str] | None = None,
    negated: bool = False,
) -> Match:
    """`-m tcp`: a source or destination port, or `--tcp-flags MASK COMPARE` (`negated`: `!`)."""
    words = _port_words(sport, dport)
    mask = compare = 0
    if flags is not None:
        mask, compare = (sum(_TCP_FLAGS[f] for f in names.split(",")) for names in flags)
        words.append(f"{'! ' if negated else ''}--tcp-flags {flags[0]} {flags[1]}")
    # struct xt_tcp: spts[2], dpts[2], option, flg_mask, flg_cmp, invflags (XT_TCP_INV_FLAGS = 4)
    data = struct.pack("=4H4B4x", *_range(sport), *_range(dport), 0, mask, compare, 4 if negated else 0)
    return Match("tcp", " ".join(words), 0, data)


def udp(sport: int | None = None, dport: int | None = None) -> Match:
    data = struct.pack("=4HB5x", *_range(sport), *_range(dport), 0)  # struct xt_udp: spts, dpts, invflags
    return Match("udp", " ".join(_port_words(sport, dport)), 0, data)


def ports(protocol: str, sport: int | None = None, dport: int | None = None) -> Match:
    return tcp(sport, dport) if protocol == "tcp" else udp(sport, dport)


def icmp(family: Family, icmp_type: int) -> Match:
    data = struct.pack("=4B4x", icmp_type, 0, 0xFF, 0)  # struct ipt_icmp: type, code[2], invflags
    if family == 4:
        return Match("icmp", f"--icmp-type {icmp_type}", 0, data)
    return Match("icmp6", f"--icmpv6-type {icmp_type}", 0, data)


def owner(uid: int, negated: bool = False) -> Match:
    # struct xt_owner_match_info: uid_min, uid_max, gid_min, gid_max, match, invert (XT_OWNER_UID)
    data = struct.pack("=4I2B6x", uid, uid, 0, 0, 1, 1 if negated else 0)
    return Match("owner", f"{'! ' if negated else ''}--uid-owner {uid}", 1, data)


def multiport(destinations: Sequence[PortRange]) -> Match:
    """`--dports`: at most 15 slots, a range taking two."""
    slots: list[int] = []
    flags: list[int] = []
    for p in destinations:
        slots += [p.low] if p.low == p.high else [p.low, p.high]
        flags += [0] if p.low == p.high else [1, 0]
    assert len(slots) <= _MULTIPORT_SLOTS
    padding = _MULTIPORT_SLOTS - len(slots)
    # struct xt_multiport_v1: flags (XT_MULTIPORT_DESTINATION), count, ports[15], pflags[15], invert
    data = struct.pack("=2B15H15BB", 1, len(slots), *slots, *[0] * padding, *flags, *[0] * padding, 0)
    words = ",".join(str(p.low) if p.low == p.high else f"{p.low}:{p.high}" for p in destinations)
    return Match("multiport", f"--dports {words}", 1, data)


_PLAIN = re.compile(r"[A-Za-z0-9_-]+")


def comment(text: str) -> Match:
    """`--comment`, quoted as `iptables-save` quotes any string with other characters than these
    (libxtables' xtables_save_string): containers sharing a UID are listed "app,proxy"."""
    encoded = text.encode()
    assert len(encoded) < 256
    words = text if _PLAIN.fullmatch(text) else '"' + re.sub(r"([\"'\\])", r"\\\1", text) + '"'
    return Match("comment", f"--comment {words}", 0, encoded.ljust(256, b"\0"))


_ADDRTYPES = {"LOCAL": 0x04, "BROADCAST": 0x08, "MULTICAST": 0x20}


def addrtype(destination: str) -> Match:
    dest = sum(_ADDRTYPES[t] for t in destination.split(","))
    data = struct.pack("=2HI", 0, dest, 0)  # struct xt_addrtype_info_v1: source, dest, flags
    return Match("addrtype", f"--dst-type {destination}", 1, data)


def reply_direction() -> Match:
    """`-m conntrack --ctdir REPLY` (struct xt_conntrack_mtinfo3: XT_CONNTRACK_DIRECTION in both
    match_flags and invert_flags)."""
    direction = 1 << 12
    data = bytes(146) + struct.pack("=2H", direction, direction) + bytes(168 - 150)
    return Match("conntrack", "--ctdir REPLY", 3, data)


def reject(family: Family, with_: str) -> Target:
    codes = {
        4: {"tcp-reset": 7, "icmp-port-unreachable": 3, "icmp-admin-prohibited": 8},
        6: {"tcp-reset": 6, "icmp6-port-unreachable": 4, "icmp6-adm-prohibited": 1},
    }
    return Target("REJECT", f"--reject-with {with_}", data=struct.pack("=I4x", codes[family][with_]))


@dataclass(frozen=True)
class _Icmp:
    proto: str
    error_types: tuple[int, ...]
    unreachable: str
    prohibited: str


_ICMP: dict[Family, _Icmp] = {
    4: _Icmp("icmp", (3, 11, 12), "icmp-port-unreachable", "icmp-admin-prohibited"),
    6: _Icmp("ipv6-icmp", (1, 2, 3, 4), "icmp6-port-unreachable", "icmp6-adm-prohibited"),
}
_SYN_ACK = ("SYN,ACK", "SYN,ACK")


def jump_rules(family: Family) -> list[Rule]:
    """The rules that must begin OUTPUT, in this order, and be its only jumps to our chain: the
    packets that stay in the pod, or of which the kernel keeps a copy for it (see WHICH PACKETS)."""
    to_us = jump(CHAIN)
    loopback = "127.0.0.0/8" if family == 4 else "::1/128"
    rules = [Rule(to_us, out_interface="lo"), Rule(to_us, destination=loopback)]
    rules.append(Rule(to_us, (addrtype("LOCAL"),)))
    for proto in ("udp", "udplite"):
        if family == 4:
            rules.append(Rule(to_us, (addrtype("BROADCAST,MULTICAST"),), protocol=proto))
        else:
            rules.append(Rule(to_us, protocol=proto, destination="ff00::/8"))
    return rules


def _multiport_chunks(ranges: tuple[PortRange, ...]) -> list[list[PortRange]]:
    chunks: list[list[PortRange]] = [[]]
    used = 0
    for p in ranges:
        cost = 1 if p.low == p.high else 2
        if used + cost > _MULTIPORT_SLOTS:
            chunks.append([])
            used = 0
        chunks[-1].append(p)
        used += cost
    return chunks


def _owners(owned: Owner, negated: bool) -> list[Match]:
    """One owner match per UID: negated, all must hold (none of them); else one rule each."""
    return [owner(uid, negated) for uid in owned.uids]


def _judging(rs: RuleSet, family: Family) -> list[Rule]:
    icmp_ = _ICMP[family]
    rules = [
        Rule(ACCEPT, (tcp(flags=("SYN", "SYN"), negated=True),), "tcp"),
        Rule(goto(SERVE_CHAIN), (tcp(flags=_SYN_ACK),), "tcp"),
    ]
    rules += [Rule(ACCEPT, (icmp(family, t),), icmp_.proto) for t in icmp_.error_types]
    rules += [
        Rule(goto(REFUSE_CHAIN), (udp(sport=o.port), *_owners(o, True), comment(o.containers)), "udp")
        for o in rs.owned("udp")
    ]
    if rs.stateful:
        rules.append(Rule(ACCEPT, (reply_direction(),)))
    rules += [
        Rule(reject(family, icmp_.prohibited), (ports(proto, dport=rs.sentinel_port),), proto)
        for proto in ("tcp", "udp")
    ]
    if rs.allow_root:
        rules.append(Rule(ACCEPT, (owner(0),)))
    rules += [
        Rule(ACCEPT, (owner(g.uid), multiport(chunk), comment(g.containers)), g.protocol)
        for g in rs.grants
        for chunk in _multiport_chunks(g.ports)
    ]
    rules.append(Rule(goto(REFUSE_CHAIN)))
    return rules


def _serve(rs: RuleSet) -> list[Rule]:
    """SYN-ACKs, in a chain of their own so that a SYN never walks the declared ports."""
    rules = []
    for o in rs.owned("tcp"):
        served = tcp(sport=o.port)
        rules += [Rule(ACCEPT, (served, match, comment(o.containers)), "tcp") for match in _owners(o, False)]
        rules.append(Rule(goto(REFUSE_CHAIN), (served,), "tcp"))
    return [*rules, Rule(ACCEPT)]


def _refuse(rs: RuleSet) -> list[Rule]:
    rules = [Rule(goto(DENY_CHAIN), (owner(i.uid), comment(i.containers))) for i in rs.identities]
    return [*rules, Rule(goto(DENY_CHAIN))]


def _deny(rs: RuleSet, family: Family) -> list[Rule]:
    if rs.mode == "audit":
        return [Rule(ACCEPT)]
    return [
        Rule(reject(family, "tcp-reset"), protocol="tcp"),
        Rule(reject(family, _ICMP[family].unreachable), protocol="udp"),
        Rule(DROP),
    ]


def chain_rules(rs: RuleSet, family: Family) -> dict[str, list[Rule]]:
    """Our chains and their rules."""
    return {
        CHAIN: _judging(rs, family),
        SERVE_CHAIN: _serve(rs),
        REFUSE_CHAIN: _refuse(rs),
        DENY_CHAIN: _deny(rs, family),
    }


def chains(rs: RuleSet, family: Family) -> dict[str, list[str]]:
    """Our chains' rules as `iptables-save` lists them, less the `-A CHAIN ` prefix."""
    return {chain: list(map(str, rules)) for chain, rules in chain_rules(rs, family).items()}


def jumps(family: Family) -> list[str]:
    return list(map(str, jump_rules(family)))


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
    ours = chains(rs, family)
    lines = ["*filter", *(f":{chain} - [0:0]" for chain in ours)]
    lines += [f"-A {chain} {rule}" for chain, rules in ours.items() for rule in rules]
    if not jumps_in_place(output, family):
        lines += [f"-D OUTPUT {rule}" for rule in output if rule.endswith(f"-j {CHAIN}")]
        lines += [f"-I OUTPUT {i} {jump}" for i, jump in enumerate(jumps(family), 1)]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"
