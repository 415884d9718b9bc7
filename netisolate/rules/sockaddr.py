"""The socket guard: a pod's ruleset as cgroup BPF programs that judge connect(), sendmsg() and
bind() — once per call, not once per packet — and the maps they read. Pure; the kernel half is
netisolate.backends.bpf.

WHY. Any netfilter hook in a pod's namespace is paid by every packet: on this project's loopback
benchmark an empty output base chain costs about 2 % of the connection rate and the smallest table
that can judge loopback about 3.5 %, before a single grant. A program attached to the pod's cgroup
runs only when a container names a destination; a connection's packets meet nothing.

WHERE. The programs are attached to the pod's own cgroup, so every container's cgroup below it
inherits them, from the first instruction of its first process; a process outside the pod (the
runtime's port-forward) meets none of them. Each call is judged by the calling task, not by the
socket as netfilter does. Who the caller is, the identity every map is keyed by:
- cgroup identity: its cgroup at the containers' level (`get_current_ancestor_cgroup_id(level)`,
  the same kind of ID `socket cgroupv2 level N` compares); under uid+cgroup its real UID too. A
  process of the pod's cgroup that is in no container's (the level's ancestor is 0) or in a cgroup
  the agent has not seen is granted nothing.
- UID identity: its real UID, kept where a cgroup ID goes (so counters and the record read the
  same). UID 0 is no exception here: the runtime it stands for in the table (port-forward) runs
  outside the pod's cgroup and never meets the guard, so inside the pod root is granted what a
  container running as 0 is granted, which admission says is nothing. Where a process's real and
  effective UIDs differ (a set-user-ID program, which admission's no-privilege-escalation rule
  keeps out), the guard judges the real one, the table the effective one its socket was made by.
So a socket handed to another container (SCM_RIGHTS over an abstract unix socket, which the pod's
containers share) is judged by whoever uses it. Whether the programs run at all is the socket's
cgroup's affair, though (the one it was made in): a socket made outside the pod's cgroup and
handed in is never judged; only the node's own processes can make one in the pod's namespace.

WHAT IS JUDGED. A destination that stays in the pod's namespace: 127.0.0.0/8, 0.0.0.0 and ::, ::1,
their IPv4-mapped forms, what the namespace's `local` routing table names local, broadcast or
multicast (the `local4`/`local6` tries, which the caller fills from it: what nftables' `fib daddr
type` asks), and multicast and broadcast anyway (224.0.0.0/4 and above, ff00::/8), since the kernel
hands the pod's own sockets a copy. Anything else passes untouched.

THE DECISIONS, per call, in this order (the numbers are netisolate.rules' decisions):
- connect() and sendmsg() to a judged destination (rule 6): the sentinel port is refused, whoever
  asks, with EHOSTUNREACH (`set_retval`), what the table's ICMP admin-prohibited gives; (rule 8)
  one lookup of identity . protocol . port in `grants`, a longest-prefix trie, so a port range is
  a few prefixes and the lookup costs the same for 1 grant or 500; (rule 9) what no grant allows
  is counted by identity (`refused`), recorded for learning (`observed`, TCP and UDP, 256
  entries, least recently used out), and refused with EPERM — at audit, let through.
- bind() to a declared port (rules 2 and 4) is refused unless the caller's identity declares it
  (`owned`, `owners`), so a squatter never holds an owner's port at all; counted like a refusal.
  A port the kernel picks itself (port 0) is not judged: the caller must also reserve the declared
  ports in the namespace (`net.ipv4.ip_local_reserved_ports`), so no socket is ever given one.
- socket() of UDP-Lite is refused (`_create`): the kernel judges no UDP-Lite connect().

WHAT IT DOES NOT DO, so what its caller (netisolate.backends.guarded, and `unfit` below) keeps on
netfilter: it judges the address the caller names, before any NAT, so a mesh's nat REDIRECT to
loopback (or a socket load-balancer's rewrite attached further up) would be judged by its original
destination; it sees no replies, so a policy that grants UDP (whose replies netfilter lets back by
conntrack) cannot be served; the runtime is never judged, so --deny-port-forward cannot be kept.
A refusal is EPERM, not a reset, and the local tries are a snapshot of the routing table, which
the caller refreshes (an IPv6 address that finishes duplicate address detection, an interface a
CNI plugin adds later), where nftables' `fib` asks on every packet.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from netisolate.policy import PortRange, Protocol
from netisolate.rules import RuleSet
from netisolate.rules.ebpf import (
    R0,
    R1,
    R2,
    R3,
    R4,
    R5,
    R6,
    R7,
    R10,
    Insn,
    Label,
    alu,
    atomic_add,
    call,
    exit_with,
    goto,
    jump,
    load,
    load_map,
    mov,
    store,
    store_imm,
)

PROTOCOLS = {"tcp": 6, "udp": 17}
_LOOKUP, _UPDATE, _UID_GID, _ANCESTOR_CGROUP, _SET_RETVAL = 1, 2, 15, 123, 187  # helper numbers
_EHOSTUNREACH = 113
# struct bpf_sock_addr
_USER_IP4, _USER_IP6, _USER_PORT, _PROTOCOL = 4, 8, 24, 36
_SOCK_PROTOCOL, _UDPLITE = 12, 136  # struct bpf_sock's protocol; IPPROTO_UDPLITE
# the stack: an LPM key is prefixlen (u32) then the identity key: uid (u32: uid+cgroup's, else 0),
# who (u64: the cgroup ID, or under UID identity the UID), protocol and port (u16 each, network
# order); all aligned as the verifier wants
_KEY, _UID, _WHO, _PORT_KEY, _SCRATCH = -24, -20, -16, -8, -32
_LOCAL = -48  # a local4/local6 key: prefixlen, then the address
IDENTITY_KEY = 16  # bytes of uid . who . protocol . port
UNKNOWN = 2**64 - 1  # the refusal counter of callers none names: never a cgroup ID, never a UID
_FULL = IDENTITY_KEY * 8  # the prefix length of a single port


@dataclass(frozen=True)
class MapSpec:
    name: str
    kind: Literal["hash", "lpm_trie", "lru_hash"]
    key_size: int
    value_size: int
    max_entries: int


MAPS = (
    MapSpec("grants", "lpm_trie", 4 + IDENTITY_KEY, 4, 4096),
    MapSpec("owners", "hash", IDENTITY_KEY, 4, 1024),
    MapSpec("owned", "hash", 4, 4, 1024),
    MapSpec("local4", "lpm_trie", 4 + 4, 4, 256),
    MapSpec("local6", "lpm_trie", 4 + 16, 4, 256),
    MapSpec("refused", "hash", 8, 8, 1024),
    MapSpec("observed", "lru_hash", IDENTITY_KEY, 8, 256),
)

# (attach point, which body); the attach points are the kernel's enum bpf_attach_type names
ATTACH = (
    ("connect4", "judge4"),
    ("connect6", "judge6"),
    ("sendmsg4", "judge4"),
    ("sendmsg6", "judge6"),
    ("bind4", "bind"),
    ("bind6", "bind"),
    ("sock_create", "create"),
)


@dataclass(frozen=True)
class Guard:
    """What the guard of one pod is: its programs (by body) and what each map must hold."""

    pod: str
    programs: dict[str, tuple[Insn | Label, ...]]
    entries: dict[str, dict[bytes, bytes]]  # map name -> key -> value; local4/6, refused counters aside
    identities: dict[int, str]  # who (cgroup ID or UID) -> containers; UNKNOWN: callers none names


def identity_key(uid: int, who: int, protocol: int, port: int) -> bytes:
    """The 16 bytes every map keyed by identity uses: host-order UID and who (as the helpers return
    them), protocol and port in network order (as the socket address holds the port, and as a
    longest-prefix trie compares: most significant byte first)."""
    return struct.pack("=IQ", uid, who) + struct.pack(">HH", protocol, port)


def prefixes(ports: PortRange) -> list[tuple[int, int]]:
    """The fewest (port, prefix bits) blocks that cover low..high exactly."""
    out, low = [], ports.low
    while low <= ports.high:
        bits = 0
        while bits < 16 and low % (1 << (bits + 1)) == 0 and low + (1 << (bits + 1)) - 1 <= ports.high:
            bits += 1
        out.append((low, 16 - bits))
        low += 1 << bits
    return out


@dataclass(frozen=True)
class _Known:
    """An identity the guard names: (uid, who) as identity_key takes them, its containers, grants."""

    uid: int
    who: int
    containers: str
    grants: tuple[tuple[Protocol, tuple[PortRange, ...]], ...]


def _known(rs: RuleSet) -> list[_Known]:
    if rs.cgroups is None:  # UID identity: the UID is who
        return [
            _Known(0, i.uid, i.containers, tuple((g.protocol, g.ports) for g in rs.grants if g.uid == i.uid))
            for i in rs.identities
        ]
    by_uid = rs.cgroups.by_uid
    return [
        _Known(m.uid if by_uid and m.uid is not None else 0, m.cgroup.id, m.name, m.grants)
        for m in rs.cgroups.usable()
        if m.cgroup is not None
    ]


def _grants(known: list[_Known], sentinel: int) -> dict[bytes, bytes]:
    entries = {}
    for k in known:
        for protocol, ranges in k.grants:
            for ports in ranges:
                for low, bits in prefixes(ports):
                    if bits == 16 and low == sentinel:
                        continue  # dead behind the sentinel's refusal
                    key = identity_key(k.uid, k.who, PROTOCOLS[protocol], low)
                    entries[struct.pack("=I", _FULL - 16 + bits) + key] = struct.pack("=I", 1)
    return entries


def _owners(rs: RuleSet, known: list[_Known]) -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
    """owned: each declared (protocol, port); owners: each identity that declares one."""
    one = struct.pack("=I", 1)
    declared: list[tuple[Protocol, int, list[_Known]]]
    if rs.cgroups is None:
        by_who = {k.who: k for k in known}
        declared = [(o.protocol, o.port, [by_who[u] for u in o.uids if u in by_who]) for o in rs.owners]
    else:
        by_name = {k.containers: k for k in known}
        declared = [
            (o.protocol, o.port, [by_name[n] for n in o.members if n in by_name]) for o in rs.cgroups.owners
        ]
    owned, owners = {}, {}
    for protocol, port, keys in declared:
        owned[struct.pack(">HH", PROTOCOLS[protocol], port)] = one
        for k in keys:
            owners[identity_key(k.uid, k.who, PROTOCOLS[protocol], port)] = one
    return owned, owners


def unfit(rs: RuleSet) -> str | None:
    """Why the guard cannot serve this ruleset as netfilter would (None: it can). The namespace's
    own NAT is the caller's to check: it is not in the ruleset."""
    if rs.own_cgroup is None:
        return "the pod's cgroup is not known yet"
    if rs.stateful:
        return "the pod grants UDP or is at audit: replies need conntrack"
    if not rs.allow_root:  # (so is every user-namespaced pod, whose UIDs the helpers would not map)
        return "the runtime's port-forward is refused here, and it runs outside the pod's cgroup"
    return None


@lru_cache(maxsize=1024)
def guard(rs: RuleSet) -> Guard:
    """The guard for a ruleset, whatever unfit() says of it. Cached, as nft.expected is: the agent
    compares each pod's on every round; callers never change it."""
    known = _known(rs)
    owned, owners = _owners(rs, known)
    if rs.cgroups is None:
        identities = {k.who: k.containers for k in known}
    else:  # every container seen, those under uid+cgroup without a UID too (their refusals count)
        identities = {m.cgroup.id: m.name for m in rs.cgroups.members if m.cgroup is not None}
    bodies = {
        "judge4": _judge4(rs),
        "judge6": _judge6(rs),
        "bind": _bind(rs),
        "create": _create(rs),
    }
    entries = {"grants": _grants(known, rs.sentinel_port), "owned": owned, "owners": owners}
    return Guard(rs.pod, bodies, entries, {UNKNOWN: "", **identities})


def _identity(rs: RuleSet) -> list[Insn | Label]:
    """The caller's identity onto the stack: its UID (under uid+cgroup, else 0), then who it is
    (its cgroup at the level, or under UID identity its UID)."""
    real_uid = [call(_UID_GID), alu(R0, "<<=", 32), alu(R0, ">>=", 32)]  # the low half: the UID
    if rs.cgroups is None:
        return [*real_uid, store_imm(4, R10, _UID, 0), store(8, R10, _WHO, R0)]
    out: list[Insn | Label] = []
    if rs.cgroups.by_uid:
        out += [*real_uid, store(4, R10, _UID, R0)]
    else:
        out.append(store_imm(4, R10, _UID, 0))
    out += [alu(R1, "=", rs.cgroups.level), call(_ANCESTOR_CGROUP), store(8, R10, _WHO, R0)]
    return out


def _protocol_and_port() -> list[Insn | Label]:
    """The call's protocol and port onto the stack, network order, after the identity (the
    protocol's low byte: TCP, UDP and UDP-Lite all fit in it)."""
    return [
        load(4, R2, R6, _PROTOCOL),
        alu(R2, "<<=", 8),  # stored as a u16 little-endian: [0, protocol], i.e. network order
        store(2, R10, _PORT_KEY, R2),
        load(2, R2, R6, _USER_PORT),  # already network order
        store(2, R10, _PORT_KEY + 2, R2),
    ]


def _lookup(name: str, key: int) -> list[Insn | Label]:
    return [load_map(R1, name), mov(R2, R10), alu(R2, "+=", key), call(_LOOKUP)]


def _count() -> list[Insn | Label]:
    """refused[who] += 1, or refused[UNKNOWN] for a who that holds no counter (none of ours)."""
    return [
        *_lookup("refused", _WHO),
        jump(R0, "!=", 0, "count"),
        store_imm(8, R10, _SCRATCH, -1),  # UNKNOWN: the immediate is sign-extended to 64 bits
        *_lookup("refused", _SCRATCH),
        jump(R0, "==", 0, "counted"),
        Label("count"),
        alu(R1, "=", 1),
        atomic_add(R0, 0, R1),
        Label("counted"),
    ]


def _verdict(rs: RuleSet) -> list[Insn | Label]:
    return exit_with(1 if rs.mode == "audit" else 0)


def _judge(rs: RuleSet) -> list[Insn | Label]:
    """From `judged:` on, with the context in r6: the sentinel, the grant, the record, the refusal."""
    sentinel = struct.unpack("=H", struct.pack(">H", rs.sentinel_port))[0]
    return [
        Label("judged"),
        load(2, R2, R6, _USER_PORT),
        jump(R2, "==", sentinel, "sentinel"),
        *_identity(rs),
        *_protocol_and_port(),
        store_imm(4, R10, _KEY, _FULL),
        *_lookup("grants", _KEY),
        jump(R0, "!=", 0, "allow"),
        *_count(),
        load(4, R2, R6, _PROTOCOL),
        jump(R2, "==", PROTOCOLS["tcp"], "record"),
        jump(R2, "!=", PROTOCOLS["udp"], "refused"),
        Label("record"),
        *_lookup("observed", _UID),
        jump(R0, "==", 0, "first"),
        alu(R1, "=", 1),
        atomic_add(R0, 0, R1),
        goto("refused"),
        Label("first"),
        store_imm(8, R10, _SCRATCH, 1),
        load_map(R1, "observed"),
        mov(R2, R10),
        alu(R2, "+=", _UID),
        mov(R3, R10),
        alu(R3, "+=", _SCRATCH),
        alu(R4, "=", 0),
        call(_UPDATE),
        Label("refused"),
        *_verdict(rs),
        Label("sentinel"),  # EHOSTUNREACH, as the table's admin-prohibited: what the gate waits for
        alu(R1, "=", -_EHOSTUNREACH),
        call(_SET_RETVAL),
        *exit_with(0),
        Label("allow"),
        *exit_with(1),
    ]


def _ipv4(register: int, prefix: str) -> list[Insn | Label]:
    """Jump to `judged` when the IPv4 address in `register` (network order, loaded little-endian:
    the first octet is the low byte) stays in the pod; else to `{prefix}pass`."""
    return [
        jump(register, "==", 0, "judged"),
        mov(R2, register),
        alu(R2, "&=", 0xFF),
        jump(R2, "==", 127, "judged"),
        jump(R2, ">=", 224, "judged"),
        store_imm(4, R10, _LOCAL, 32),
        store(4, R10, _LOCAL + 4, register),
        *_lookup("local4", _LOCAL),
        jump(R0, "!=", 0, "judged"),
        goto(f"{prefix}pass"),
    ]


def _judge4(rs: RuleSet) -> tuple[Insn | Label, ...]:
    address = (mov(R6, R1), load(4, R7, R6, _USER_IP4), *_ipv4(R7, "4"))
    return (*address, Label("4pass"), *exit_with(1), *_judge(rs))


def _judge6(rs: RuleSet) -> tuple[Insn | Label, ...]:
    words = [load(4, register, R6, _USER_IP6 + 4 * i) for i, register in enumerate((R2, R3, R4, R5))]
    return (
        mov(R6, R1),
        *words,
        mov(R7, R2),
        alu(R7, "&=", 0xFF),
        jump(R7, "==", 0xFF, "judged"),  # ff00::/8
        mov(R7, R2),
        alu(R7, "|=", R3, reg=True),
        jump(R7, "!=", 0, "local6"),
        jump(R4, "==", 0xFFFF0000, "mapped", low32=True),  # ::ffff:a.b.c.d
        jump(R4, "!=", 0, "local6"),
        jump(R5, "==", 0, "judged"),  # ::
        jump(R5, "==", 0x01000000, "judged"),  # ::1
        goto("local6"),
        Label("mapped"),
        mov(R7, R5),
        *_ipv4(R7, "6"),
        Label("local6"),
        store_imm(4, R10, _LOCAL, 128),
        *(store(4, R10, _LOCAL + 4 + 4 * i, register) for i, register in enumerate((R2, R3, R4, R5))),
        *_lookup("local6", _LOCAL),
        jump(R0, "!=", 0, "judged"),
        Label("6pass"),
        *exit_with(1),
        *_judge(rs),
    )


def _bind(rs: RuleSet) -> tuple[Insn | Label, ...]:
    return (
        mov(R6, R1),
        load(2, R2, R6, _USER_PORT),
        jump(R2, "==", 0, "allow"),  # the kernel picks: reserved ports keep declared ones out
        *_protocol_and_port(),
        *_lookup("owned", _PORT_KEY),
        jump(R0, "==", 0, "allow"),
        *_identity(rs),
        *_lookup("owners", _UID),
        jump(R0, "!=", 0, "allow"),
        *_count(),
        *_verdict(rs),
        Label("allow"),
        *exit_with(1),
    )


def _create(rs: RuleSet) -> tuple[Insn | Label, ...]:
    """socket(): a UDP-Lite socket is refused (EPERM). The kernel runs no connect program for
    UDP-Lite (its protocol has no pre-connect step) and none at a connected socket's sends, so a
    connected one would send anywhere unjudged; UDP-Lite is deprecated in Linux and nothing a pod
    runs is known to need it. TCP, UDP and everything else are created as ever."""
    return (
        load(4, R2, R1, _SOCK_PROTOCOL),
        jump(R2, "==", _UDPLITE, "refused"),
        *exit_with(1),
        Label("refused"),
        *_verdict(rs),
    )
