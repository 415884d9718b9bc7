"""The ruleset in nftables: one `inet` table of our own, in `nft list`'s own format (less counter
values), so what is loaded is what the kernel lists back and drift detection is a comparison.
What the rules decide, and why, is explained once, in `netisolate.rules`.

Everything that names a container's identity lives in named sets, so the chains are the same for
every pod of a given shape and a changed policy is an element update inside the existing table:

- `grants`      identity . protocol . port-range  — rule 8, one lookup whatever the number of grants
- `owners`      identity . protocol . port        — who may serve a declared port (rules 2 and 4)
- `owned`       protocol . port                   — the declared ports
- `identities`  identity, with a counter each      — the refusals per container (rule 9)
- `observed`    identity . protocol . port        — filled by the packet path: what the grants did
  not allow (learning). Its elements are the kernel's, not ours: never drift, never loaded.

The identity is the key `IDENTITY` names (the socket's UID); the sets are declared with `typeof`
that key, so an identity of another kind changes the key, not the layout.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass

from netisolate.policy import PortRange
from netisolate.rules import RuleSet

TABLE = "netisolate"
IDENTITY = "meta skuid"
OBSERVED_SIZE = 256  # distinct identity . protocol . port per pod the kernel keeps; the rest is not recorded
OBSERVED_TIMEOUT = "1h"  # an observation not seen again for this long is forgotten by the kernel
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
# nft lists a port after a protocol match by the protocol's name (`tcp sport`), so we write it so
_SERVED = {
    proto: f"meta l4proto . {proto} sport @owned {IDENTITY} . meta l4proto . {proto} sport"
    for proto in ("tcp", "udp")
}
_FLOW = f"{IDENTITY} . meta l4proto . th dport"


@dataclass(frozen=True)
class NftSet:
    name: str
    declaration: tuple[str, ...]  # the lines before `elements`, as nft lists them
    elements: tuple[str, ...] = ()  # each `KEY[ counter][ comment "..."]`, in nft's element syntax
    dynamic: bool = False  # written by the packet path: its elements are not ours


def _port(p: PortRange) -> str:
    return str(p.low) if p.low == p.high else f"{p.low}-{p.high}"


def _comment(containers: str) -> str:
    return f' comment "{containers}"'


def sets(rs: RuleSet) -> tuple[NftSet, ...]:
    """The table's named sets with the elements this ruleset wants, in a stable order."""
    grants = [
        f"{g.uid} . {g.protocol} . {_port(p)}{_comment(g.containers)}" for g in rs.grants for p in g.ports
    ]
    owners = [f"{uid} . {o.protocol} . {o.port}{_comment(o.containers)}" for o in rs.owners for uid in o.uids]
    return (
        NftSet("grants", (f"typeof {_FLOW}", "flags interval"), tuple(grants)),
        NftSet("owners", (f"typeof {IDENTITY} . meta l4proto . th sport",), tuple(owners)),
        NftSet(
            "owned", ("typeof meta l4proto . th sport",), tuple(f"{o.protocol} . {o.port}" for o in rs.owners)
        ),
        NftSet(
            "identities",
            (f"typeof {IDENTITY}", "counter"),
            tuple(f"{i.uid} counter{_comment(i.containers)}" for i in rs.identities),
        ),
        NftSet(
            "observed",
            (
                f"typeof {_FLOW}",
                f"size {OBSERVED_SIZE}",
                "flags dynamic,timeout",
                "counter",
                f"timeout {OBSERVED_TIMEOUT}",
            ),
            dynamic=True,
        ),
    )


def _judging(rs: RuleSet) -> list[str]:
    rules = [
        "tcp flags ! syn accept",
        f"{_SYN_ACK} {_SERVED['tcp']} != @owners goto refuse",
        f"{_SYN_ACK} accept",
        "icmp type { destination-unreachable, time-exceeded, parameter-problem } accept",
        "icmpv6 type { destination-unreachable, packet-too-big, time-exceeded, parameter-problem } accept",
        f"{_SERVED['udp']} != @owners goto refuse",
    ]
    if rs.stateful:
        rules.append("ct direction reply accept")
    rules.append(
        f"meta l4proto {{ tcp, udp }} th dport {rs.sentinel_port} reject with icmpx admin-prohibited"
    )
    if rs.allow_root:
        rules.append(f"{IDENTITY} 0 accept")
    rules += [
        f"{_FLOW} @grants accept",
        f"meta l4proto {{ tcp, udp }} update @observed {{ {_FLOW} }}",
        "goto refuse",
    ]
    return rules


def _refuse() -> list[str]:
    return [f"{IDENTITY} @identities goto deny", "counter goto deny"]


def _deny(rs: RuleSet) -> list[str]:
    if rs.mode == "audit":
        return ["accept"]
    return ["meta l4proto tcp reject with tcp reset", "meta l4proto udp reject", "drop"]


def _set_block(s: NftSet) -> str:
    lines = [f"\t\t{line}\n" for line in s.declaration]
    if s.elements and not s.dynamic:
        lines.append("\t\telements = { " + ",\n\t\t\t     ".join(s.elements) + " }\n")
    return f"\tset {s.name} {{\n" + "".join(lines) + "\t}"


def table(rs: RuleSet) -> str:
    """The table block as `nft list table inet netisolate` prints it, but for the line breaks inside
    element lists; counters print as `counter`."""
    chains = {
        "output": [
            "type filter hook output priority filter; policy accept;",
            *(f"{match} jump loopback" for match in _JUDGED),
        ],
        "loopback": _judging(rs),
        "refuse": _refuse(),
        "deny": _deny(rs),
    }
    blocks = [_set_block(s) for s in sets(rs)]
    blocks += [
        f"\tchain {name} {{\n" + "".join(f"\t\t{line}\n" for line in lines) + "\t}"
        for name, lines in chains.items()
    ]
    return f"table inet {TABLE} {{\n" + "\n\n".join(blocks) + "\n}\n"


def create(rs: RuleSet) -> str:
    """The `nft -f` document for a namespace that has no table of ours: it fails ("File exists")
    rather than touch one that is there, and costs a third of a replacement (no RCU wait)."""
    return f"create table inet {TABLE}\n{table(rs)}"


def replace(rs: RuleSet) -> str:
    """The `nft -f` document that replaces our table, whatever is there: declare (so it works on a
    first apply too), delete, re-create. The kernel applies all of it or none, so there is no moment
    with half a table, and loading it twice leaves the same table: atomic and idempotent."""
    return f"table inet {TABLE}\ndelete table inet {TABLE}\n{table(rs)}"


# --- reading a listing back ----------------------------------------------------------------------

_ELEMENTS = re.compile(r"\n\t\telements = \{ (.*?) \}(?=\n)", re.DOTALL)
_SET_NAME = re.compile(r"\tset (\S+) \{\n")
_COUNTER = re.compile(r"counter packets \d+ bytes \d+")
_STATE = re.compile(r" (?:counter|comment)\b.*$")
_ITEM = re.compile(r'(?:[^,"]|"[^"]*")+')


@dataclass(frozen=True)
class Listing:
    """A table split into its layout (chains and set declarations, counters without values) and the
    elements of each set, as nft lists them."""

    layout: str
    elements: Mapping[str, tuple[str, ...]]


def parse(text: str) -> Listing:
    """Parse `nft list table` output (or `table()`); element order and line breaks do not count."""
    layout = _COUNTER.sub("counter", _ELEMENTS.sub("", text))
    elements = {
        name: tuple(_COUNTER.sub("counter", e) for e in items) for name, items in _raw_elements(text).items()
    }
    return Listing(layout, elements)


def element_key(element: str, interval: bool) -> str:
    """What identifies an element to `delete element`: the key, without counter and comment. In an
    interval set a single port is spelt as the range `P-P` (nft 1.0.6 finds no element otherwise)."""
    key = _STATE.sub("", element)
    last = key.rsplit(" ", 1)[-1]
    return f"{key}-{last}" if interval and last.isdigit() else key


def _element_changes(rs: RuleSet, listed: Listing) -> list[tuple[NftSet, list[str], list[str]]]:
    """(set, elements missing, elements unexpected) for each of our sets; dynamic sets never count."""
    changes = []
    for s in sets(rs):
        if not s.dynamic:
            have = listed.elements.get(s.name, ())
            missing = [e for e in s.elements if e not in have]
            changes.append((s, missing, sorted(set(have) - set(s.elements))))
    return changes


def update(rs: RuleSet, listed: Listing) -> str | None:
    """The `nft -f` document that turns a listed table with this ruleset's layout into exactly this
    ruleset by element updates alone — one transaction, so no packet sees a half-changed policy —
    or None when the layout differs (then only `replace` will do). "" when nothing is to change."""
    if parse(table(rs)).layout != listed.layout:
        return None
    lines = []
    for s, missing, unexpected in _element_changes(rs, listed):
        if unexpected:
            keys = ", ".join(sorted({element_key(e, "flags interval" in s.declaration) for e in unexpected}))
            lines.append(f"delete element inet {TABLE} {s.name} {{ {keys} }}\n")
        if missing:
            lines.append(f"add element inet {TABLE} {s.name} {{ {', '.join(missing)} }}\n")
    return "".join(lines)


def drift(rs: RuleSet, listed: Listing) -> list[str]:
    """What differs between a listed table and this ruleset ([] when exactly equal): layout lines
    missing or unexpected, and each set's missing or unexpected elements. Counter values and the
    kernel-written `observed` elements never count."""
    problems = _line_drift(parse(table(rs)).layout, listed.layout)
    for s, missing, unexpected in _element_changes(rs, listed):
        problems += [f"missing in set {s.name}: {e}" for e in missing]
        problems += [f"unexpected in set {s.name}: {e}" for e in unexpected]
    return problems


def _line_drift(expected: str, actual: str) -> list[str]:
    if expected == actual:
        return []
    diff = difflib.unified_diff(expected.splitlines(), actual.splitlines(), n=0, lineterm="")
    return [
        f"{'unexpected' if line[0] == '+' else 'missing'}: {line[1:].strip()}"
        for line in diff
        if line[:1] in "+-" and line[:3] not in ("+++", "---")
    ]


_OBSERVED = re.compile(r"^(.+?) \. (tcp|udp) \. (\d+) counter packets (\d+)")
_IDENTITY_COUNTER = re.compile(r'^(.+?) counter packets (\d+) bytes \d+(?: comment "([^"]*)")?')
_UNKNOWN_COUNTER = re.compile(r"counter packets (\d+) bytes \d+ goto deny\n")


def observed(text: str) -> list[tuple[str, str, int, int]]:
    """(identity, protocol, port, packets) of each element of the listed `observed` set."""
    found = []
    for element in _raw_elements(text).get("observed", ()):
        match = _OBSERVED.match(element)
        if match:
            found.append((match[1], match[2], int(match[3]), int(match[4])))
    return found


def refused(text: str) -> dict[str, int]:
    """Refused packets by the containers of each identity ("" for sockets of no known identity)."""
    counts: dict[str, int] = {}
    for element in _raw_elements(text).get("identities", ()):
        match = _IDENTITY_COUNTER.match(element)
        if match:
            counts[match[3] or ""] = counts.get(match[3] or "", 0) + int(match[2])
    for packets in _UNKNOWN_COUNTER.findall(text):
        counts[""] = counts.get("", 0) + int(packets)
    return counts


def _raw_elements(text: str) -> Mapping[str, tuple[str, ...]]:
    """The elements of each set as listed, counter values kept."""
    out: dict[str, tuple[str, ...]] = {}
    for match in _ELEMENTS.finditer(text):
        names = _SET_NAME.findall(text, 0, match.start())
        out[names[-1] if names else ""] = tuple(
            " ".join(i.split()) for i in _ITEM.findall(match[1]) if i.strip()
        )
    return out
