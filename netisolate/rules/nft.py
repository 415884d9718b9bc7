"""The ruleset in nftables: one `inet` table of our own, in `nft list`'s own format (less counter
values), so what is loaded is what the kernel lists back and drift detection is a text comparison.
What the rules decide, and why, is explained once, in `netisolate.rules`."""

from __future__ import annotations

from netisolate.policy import PortRange
from netisolate.rules import Owner, RuleSet

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


def _one_or_set(items: list[str]) -> str:
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


def _ports(ports: tuple[PortRange, ...]) -> str:
    return _one_or_set([str(p.low) if p.low == p.high else f"{p.low}-{p.high}" for p in ports])


def _uids(owner: Owner) -> str:
    return _one_or_set([str(uid) for uid in owner.uids])


def _judging(rs: RuleSet) -> list[str]:
    rules = [
        "tcp flags ! syn accept",
        f"{_SYN_ACK} goto serve",
        "icmp type { destination-unreachable, time-exceeded, parameter-problem } accept",
        "icmpv6 type { destination-unreachable, packet-too-big, time-exceeded, parameter-problem } accept",
    ]
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
    """SYN-ACKs, in a chain of their own so that a SYN never walks the declared ports."""
    rules = []
    for owner in rs.owned("tcp"):
        served = f"tcp sport {owner.port}"
        rules += [
            f'{served} meta skuid {_uids(owner)} accept comment "{owner.containers}"',
            f"{served} goto refuse",
        ]
    return [*rules, "accept"]


def _refuse(rs: RuleSet) -> list[str]:
    rules = [f'meta skuid {i.uid} counter goto deny comment "{i.containers}"' for i in rs.identities]
    return [*rules, "counter goto deny"]


def _deny(rs: RuleSet) -> list[str]:
    if rs.mode == "audit":
        return ["accept"]
    return ["meta l4proto tcp reject with tcp reset", "meta l4proto udp reject", "drop"]


def table(rs: RuleSet) -> str:
    """The table block as `nft list table inet netisolate` prints it; counters print as `counter`."""
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
    body = "\n\n".join(
        f"\tchain {name} {{\n" + "".join(f"\t\t{line}\n" for line in lines) + "\t}"
        for name, lines in chains.items()
    )
    return f"table inet {TABLE} {{\n{body}\n}}\n"


def create(rs: RuleSet) -> str:
    """The `nft -f` document for a namespace that has no table of ours: it fails ("File exists")
    rather than touch one that is there, and costs a third of a replacement (no RCU wait)."""
    return f"create table inet {TABLE}\n{table(rs)}"


def replace(rs: RuleSet) -> str:
    """The `nft -f` document that replaces our table, whatever is there: declare (so it works on a
    first apply too), delete, re-create. The kernel applies all of it or none, so there is no moment
    with half a table, and loading it twice leaves the same table: atomic and idempotent."""
    return f"table inet {TABLE}\ndelete table inet {TABLE}\n{table(rs)}"
