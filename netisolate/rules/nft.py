"""The ruleset in nftables: one `inet` table of our own, in `nft list`'s own format (less counter
values), so what is loaded is what the kernel lists back and drift detection is a text comparison.
What the rules decide, and why, is explained once, in `netisolate.rules`."""

from __future__ import annotations

from netisolate.policy import PortRange
from netisolate.rules import Cgroup, CgroupOwner, CgroupRules, Member, Owner, RuleSet

TABLE = "netisolate"
# the packets that stay in the pod, or of which the kernel keeps a copy for it (see WHICH PACKETS)
_JUDGED = (
    'oif "lo"',
    "ip daddr 127.0.0.0/8",
    "ip6 daddr ::1",
    "fib daddr type local",
    "meta l4proto { udp, udplite } fib daddr type { broadcast, multicast }",
    "meta l4proto { udp, udplite } ip6 daddr ff00::/8",
)
_SYN_ACK = "tcp flags syn,ack / syn,ack"
_FIRST = (  # decisions 1-3, whatever the identity
    "tcp flags ! syn accept",
    f"{_SYN_ACK} goto serve",
    "icmp type { destination-unreachable, time-exceeded, parameter-problem } accept",
    "icmpv6 type { destination-unreachable, packet-too-big, time-exceeded, parameter-problem } accept",
)


def _one_or_set(items: list[str]) -> str:
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


def _ports(ports: tuple[PortRange, ...]) -> str:
    return _one_or_set([str(p.low) if p.low == p.high else f"{p.low}-{p.high}" for p in ports])


def _uids(owner: Owner) -> str:
    return _one_or_set([str(uid) for uid in owner.uids])


def _judging(rs: RuleSet) -> list[str]:
    if rs.cgroups is not None:
        return _judging_by_cgroup(rs, rs.cgroups)
    rules = list(_FIRST)
    rules += [
        f'udp sport {owner.port} meta skuid != {_uids(owner)} goto refuse comment "{owner.containers}"'
        for owner in rs.owned("udp")
    ]
    if rs.stateful:
        rules.append("ct direction reply accept")
    rules.append(
        f"meta l4proto {{ tcp, udp }} th dport {rs.sentinel_port} reject with icmpx admin-prohibited"
    )
    if rs.allow_root:
        rules.append("meta skuid 0 accept")
    rules += [
        f'meta skuid {g.uid} {g.protocol} dport {_ports(g.ports)} accept comment "{g.containers}"'
        for g in rs.grants
    ]
    rules.append("goto refuse")
    return rules


def _serve(rs: RuleSet) -> list[str]:
    """SYN-ACKs, in a chain of their own so that a SYN never walks the declared ports. By cgroup,
    a SYN-ACK's request socket has no cgroup to match (`socket cgroupv2` breaks on it): a declared
    TCP port is kept to its owners on input instead (`_receiving`), where the SYN meets the
    listener; under uid+cgroup the owners' UIDs are held to it here as well."""
    if rs.cgroups is None:
        owners = [(o.port, o.uids, o.containers) for o in rs.owned("tcp")]
    else:
        cg = rs.cgroups
        owners = [(o.port, cg.uids(o), ",".join(o.members)) for o in cg.owned("tcp")] if cg.by_uid else []
    rules = []
    for port, uids, containers in owners:
        served = f"tcp sport {port}"
        if uids:
            owned_by = _one_or_set([str(u) for u in uids])
            rules.append(f'{served} meta skuid {owned_by} accept comment "{containers}"')
        rules.append(f"{served} goto refuse")
    return [*rules, "accept"]


def _refuse(rs: RuleSet) -> list[str]:
    if rs.cgroups is not None:
        cg = rs.cgroups
        rules = [f'{_in(cg, m.set)} counter goto deny comment "{m.name}"' for m in cg.members]
    else:
        rules = [f'meta skuid {i.uid} counter goto deny comment "{i.containers}"' for i in rs.identities]
    return [*rules, "counter goto deny"]


# --- cgroup identity (see CGROUP IDENTITY) -----------------------------------------------------


def _in(cg: CgroupRules, set_name: str, level: int | None = None, negated: bool = False) -> str:
    depth = cg.level if level is None else level
    return f"socket cgroupv2 level {depth} {'!= ' if negated else ''}@{set_name}"


def _member(cg: CgroupRules, m: Member) -> str:
    """The match for a member's sockets: its cgroup, and under uid+cgroup its UID as well."""
    return (f"meta skuid {m.uid} " if cg.by_uid else "") + _in(cg, m.set)


def _not_owner(cg: CgroupRules, owner: CgroupOwner) -> str:
    return " ".join(_in(cg, f"c-{name}", negated=True) for name in owner.members)


def _judging_by_cgroup(rs: RuleSet, cg: CgroupRules) -> list[str]:
    usable = [m for m in cg.members if m.uid is not None or not cg.by_uid]
    rules = list(_FIRST)
    for owner in cg.owned("udp"):
        comment = f'comment "{",".join(owner.members)}"'
        rules.append(f"udp sport {owner.port} {_not_owner(cg, owner)} goto refuse {comment}")
        if cg.by_uid:
            uids = cg.uids(owner)
            others = f"meta skuid != {_one_or_set([str(u) for u in uids])} " if uids else ""
            rules.append(f"udp sport {owner.port} {others}goto refuse {comment}")
    if rs.stateful:
        rules.append("ct direction reply accept")
    rules.append(
        f"meta l4proto {{ tcp, udp }} th dport {rs.sentinel_port} reject with icmpx admin-prohibited"
    )
    rules += [
        f'{_member(cg, m)} {protocol} dport {_ports(ports)} accept comment "{m.name}"'
        for m in usable
        for protocol, ports in m.grants
    ]
    rules.append(f"{_in(cg, 'pod', level=cg.level - 1)} goto refuse")
    if rs.allow_root:
        rules.append("meta skuid 0 accept")
    rules.append("goto refuse")
    return rules


def _receiving(cg: CgroupRules) -> list[str]:
    """The input hook: what opens a flow to a declared port is refused when the socket it would be
    delivered to is in no owner's cgroup."""
    opening = {"tcp": "tcp flags syn / syn,ack tcp", "udp": "udp"}
    return [
        "type filter hook input priority filter; policy accept;",
        *(
            f"{opening[o.protocol]} dport {o.port} {_not_owner(cg, o)} goto refuse "
            f'comment "{",".join(o.members)}"'
            for o in cg.owners
        ),
    ]


def _element(cgroup: Cgroup, loading: bool) -> str:
    """nft lists an ID back when it finds no path for it (the agent lists from where it cannot)."""
    return f'"{cgroup.path}"' if loading else str(cgroup.id)


def _sets(cg: CgroupRules, loading: bool) -> list[str]:
    blocks = []
    for name, cgroup in cg.elements():
        lines = ["type cgroupsv2", *([f"elements = {{ {_element(cgroup, loading)} }}"] if cgroup else [])]
        blocks.append(f"\tset {name} {{\n" + "".join(f"\t\t{line}\n" for line in lines) + "\t}")
    return blocks


def elements(rs: RuleSet, installed: RuleSet) -> tuple[str, str]:
    """Two `nft -f` documents that turn the sets of `installed` into those of `rs`: first the new
    cgroups are added (~1 ms: the grants hold from here), then the old ones cleared out (which
    waits ~15 ms in the kernel for RCU). nft 1.0 takes a cgroup only by path, so an element whose
    cgroup is gone cannot be deleted by name: the set is flushed and refilled in one transaction,
    never empty in between. Until then it also holds the removed cgroup's ID, which nothing can be
    in again (IDs are not reused). Either document may be empty."""
    assert rs.cgroups is not None and installed.cgroups is not None
    old = dict(installed.cgroups.elements())
    added, cleared = [], []
    for name, cgroup in rs.cgroups.elements():
        if old.get(name) == cgroup:
            continue
        add = f"add element inet {TABLE} {name} {{ {_element(cgroup, True)} }}" if cgroup else ""
        added += [add] if add else []
        if old.get(name) is not None:
            cleared += [f"flush set inet {TABLE} {name}", *([add] if add else [])]
    return "".join(f"{line}\n" for line in added), "".join(f"{line}\n" for line in cleared)


def _deny(rs: RuleSet) -> list[str]:
    if rs.mode == "audit":
        return ["accept"]
    return ["meta l4proto tcp reject with tcp reset", "meta l4proto udp reject", "drop"]


def table(rs: RuleSet, loading: bool = False) -> str:
    """The table block as `nft list table inet netisolate` prints it; counters print as `counter`.
    `loading`: cgroups by path, for `nft -f` (it lists them back by ID, see CGROUP IDENTITY)."""
    chains = {
        "output": [
            "type filter hook output priority filter; policy accept;",
            *(f"{match} jump loopback" for match in _JUDGED),
        ],
        "loopback": _judging(rs),
        "serve": _serve(rs),
        "refuse": _refuse(rs),
        "deny": _deny(rs),
    }
    if rs.cgroups is not None and rs.cgroups.owners:
        chains["input"] = _receiving(rs.cgroups)
    blocks = _sets(rs.cgroups, loading) if rs.cgroups is not None else []
    blocks += [
        f"\tchain {name} {{\n" + "".join(f"\t\t{line}\n" for line in lines) + "\t}"
        for name, lines in chains.items()
    ]
    body = "\n\n".join(blocks)
    return f"table inet {TABLE} {{\n{body}\n}}\n"


def create(rs: RuleSet) -> str:
    """The `nft -f` document for a namespace that has no table of ours: it fails ("File exists")
    rather than touch one that is there, and costs a third of a replacement (no RCU wait)."""
    return f"create table inet {TABLE}\n{table(rs, loading=True)}"


def replace(rs: RuleSet) -> str:
    """The `nft -f` document that replaces our table, whatever is there: declare (so it works on a
    first apply too), delete, re-create. The kernel applies all of it or none, so there is no moment
    with half a table, and loading it twice leaves the same table: atomic and idempotent."""
    return f"table inet {TABLE}\ndelete table inet {TABLE}\n{table(rs, loading=True)}"
